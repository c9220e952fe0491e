"""The needles and questions of the needle suite (bench/fidelity_suite.py), in two wordings.

v2 (the default) is worded so that SmolLM2-135M with full attention answers most questions: the suite scores
sparse decode by the questions full attention gets right ("retrieval kept", bench/fidelity.py), so those must be
many. Full attention on the CPU at 2K (36 questions: 2 documents x 3 sources, seed 0, 2026-11-30) answers v1 11 of
36 (multi-key 6/18, single 4/6, multi-value 1/6, variable tracking 0/6) and v2 27 of 36 (14/18, 5/6, 3/6, 5/6).
What the 135M model does, and what v2 changes for it:
  - it copies the number that follows the words of the answer prefix (an induction copy); with three doors the
    words before each key were the same ("... door is") and it copied one door's key for all three; v2 puts the
    label right before the number ("The passkey of Lima is Lima-4350."; prefix "The passkey of Lima is Lima-");
  - 4-digit numbers instead of 5 (still 1 in 9,000 to guess), questions without "in the text above? Answer
    with the number only.";
  - asked for a list ("The special magic numbers for X are") it writes a markdown list of anything; v2 answers in
    two stages: the first needle's words ("One special magic number for X is"), then, after that number, the
    second's (". Another special magic number for X is"); both numbers must be the needles' (either order);
  - it cannot follow a variable chain on its own; v2's prefix states the chain ("C is a copy of B, which is a
    copy of A. The value of A is"), so the answer needs the needle holding A's value among two chain needles
    naming A: a lookup through the chain's words, not RULER's multi-hop tracking (kept as a task kind because
    the chain's needles are distractors that share its names).
v1 is the wording of the runs in bench/RESULTS.md before 2026-11-30 (--suite-wording v1 reproduces them).
A question is (kind, question, answer prefix, answer digits, numbers[, later prefixes]).
"""
from __future__ import annotations

import random
import string

WORDINGS = ("v1", "v2")
WORDS = ("lantern", "harbor", "meadow", "quartz", "falcon", "cedar", "comet", "violet", "ember", "glacier")
DOORS = ("red", "green", "blue")                  # v1 labels
PLACES = ("Lima", "Cairo", "Quito")               # v2 labels: not words of any haystack source


def var_names(rng: random.Random, n: int) -> list[str]:
    names = set()
    while len(names) < n:
        names.add("".join(rng.choice(string.ascii_uppercase) for _ in range(4)))
    # sorted first: a set of strings iterates in PYTHONHASHSEED's order, so shuffling it directly gave every process
    # other variable names (and other documents: full attention flipped on near-tie questions between runs); the
    # same n rng.random() calls as before, so the rest of the suite's draws stay as they were
    return sorted(sorted(names), key=lambda _: rng.random())


def needles(rng: random.Random, wording: str = "v2") -> tuple[list[tuple[float, str]], list[tuple]]:
    """(needles [(depth, text)], questions [(kind, question, answer prefix, answer digits, numbers)])."""
    if wording == "v1":
        return _v1(rng)
    if wording == "v2":
        return _v2(rng)
    raise ValueError(f"suite wording {wording!r}: use one of {', '.join(WORDINGS)}")


def _v2(rng: random.Random):
    keys = [str(rng.randrange(1000, 10000)) for _ in range(6)]
    out, questions = [], []
    for place, key in zip(PLACES, keys):
        out.append((rng.uniform(0.05, 0.95), f"The passkey of {place} is {place}-{key}."))
        questions.append(("multikey", f"What is the passkey of {place}?", f"The passkey of {place} is {place}-", key, 1))
    out.append((rng.uniform(0.05, 0.95), f"The secret passkey is {keys[3]}."))
    questions.append(("single", "What is the secret passkey?", "The secret passkey is", keys[3], 1))
    word = rng.choice(WORDS)
    d1, d2 = sorted(rng.uniform(0.05, 0.95) for _ in range(2))
    out += [(d1, f"One special magic number for {word} is {keys[4]}."),
            (d2, f"Another special magic number for {word} is {keys[5]}.")]
    questions.append(("multivalue", f"What are the two special magic numbers for {word}?",
                      f"One special magic number for {word} is", f"{keys[4]},{keys[5]}", 2,
                      (f". Another special magic number for {word} is",)))
    a, b, c = var_names(rng, 3)
    value = str(rng.randrange(1000, 10000))
    hops = sorted(rng.uniform(0.05, 0.95) for _ in range(3))
    out += [(hops[0], f"The value of {a} is {value}."), (hops[1], f"{b} is a copy of {a}."),
            (hops[2], f"{c} is a copy of {b}.")]
    questions.append(("vartrack", f"What is the value of {c}?",
                      f"{c} is a copy of {b}, which is a copy of {a}. The value of {a} is", value, 1))
    return out, questions


def _v1(rng: random.Random):
    keys = [str(rng.randrange(10000, 100000)) for _ in range(6)]
    out, questions = [], []
    for door, key in zip(DOORS, keys):
        out.append((rng.uniform(0.05, 0.95), f"The passkey of the {door} door is {key}. Remember it."))
        questions.append(("multikey", f"What is the passkey of the {door} door in the text above? Answer with "
                          "the number only.", f"The passkey of the {door} door is", key, 1))
    out.append((rng.uniform(0.05, 0.95), f"The secret passkey is {keys[3]}. Remember it."))
    questions.append(("single", "What is the secret passkey in the text above? Answer with the number only.",
                      "The secret passkey is", keys[3], 1))
    word = rng.choice(WORDS)
    d1, d2 = sorted(rng.uniform(0.05, 0.95) for _ in range(2))
    out += [(d1, f"One of the special magic numbers for {word} is: {keys[4]}."),
            (d2, f"One of the special magic numbers for {word} is: {keys[5]}.")]
    questions.append(("multivalue", f"What are the two special magic numbers for {word} in the text above? "
                      "Answer with the two numbers only.", f"The special magic numbers for {word} are",
                      f"{keys[4]},{keys[5]}", 2))
    a, b, c = var_names(rng, 3)
    value = str(rng.randrange(10000, 100000))
    hops = sorted(rng.uniform(0.05, 0.95) for _ in range(3))
    out += [(hops[0], f"VAR {a} = {value}."), (hops[1], f"VAR {b} = {a}."), (hops[2], f"VAR {c} = {b}.")]
    questions.append(("vartrack", f"In the text above, VAR {c} is assigned through a chain of variables. What "
                      f"number is the value of VAR {c}? Answer with the number only.",
                      f"The value of VAR {c} is", value, 1))
    return out, questions
