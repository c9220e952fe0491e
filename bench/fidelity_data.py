"""Prompts for bench/fidelity.py and tests/test_needle.py: passkey needles in natural text, teacher-forcing text.

The haystack is CPython's own documentation (`pydoc_data.topics`, shipped with the stdlib), so the bench
needs no download. Needles are inserted as token ids at line starts, so the haystack around them is
tokenized exactly as without the needle. A prompt is split in three parts:

    head   chat-template prefix up to the document (system + user turn start)
    doc    haystack with needles: the part that is prefilled exactly (dense)
    tail   question + generation prompt + answer prefix: fed through the session under test, so the
           retrieval of the needle happens in the attention path being measured
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

SINGLE_NEEDLE = "The secret passkey is {key}. Remember it."
SINGLE_QUESTION = "What is the secret passkey in the text above? Answer with the number only."
SINGLE_ANSWER = "The secret passkey is"
LABELS = ("red", "green", "blue")
MULTI_NEEDLE = "The passkey of the {label} door is {key}. Remember it."
MULTI_QUESTION = "What is the passkey of the {label} door in the text above? Answer with the number only."
MULTI_ANSWER = "The passkey of the {label} door is"
_MARK = "\u2063DOC\u2063"   # a placeholder no template touches


@dataclass(frozen=True)
class NeedleCase:
    """One haystack prompt. `first` = token offset in doc of the earliest needle (prefix before it is shared)."""

    name: str
    context: int                 # nominal size: the prompt has context - reserve tokens
    depth: float                 # depth of the asked needle in the document (0..1)
    kind: str                    # "single" | "multi"
    answer: str                  # the asked passkey (digits)
    head: list[int] = field(repr=False)
    doc: list[int] = field(repr=False)
    tail: list[int] = field(repr=False)
    first: int = 0
    haystack: int = 0            # which haystack segment (cases of one segment share prefixes)


def haystack_ids(tokenizer) -> list[int]:
    """All of pydoc_data.topics as one token stream (~113K tokens for SmolLM2's tokenizer)."""
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[k].strip() for k in sorted(topics))
    return tokenizer.encode(text, add_special_tokens=False)


def split_template(tokenizer, question: str, answer_prefix: str) -> tuple[list[int], list[int]]:
    """(head ids, tail ids) of a one-user-turn chat whose content is <doc> + question."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _MARK + "\n\n" + question}],
                                             add_generation_prompt=True)
    head, tail = rendered.split(_MARK)
    return (tokenizer.encode(head, add_special_tokens=False),
            tokenizer.encode(tail + answer_prefix, add_special_tokens=False))


def _line_starts(tokenizer, ids: list[int]) -> list[int]:
    """Offsets i such that ids[i-1] ends a line: needles go there, between whole lines."""
    newline_ids = {t for t in set(ids) if tokenizer.decode([t], skip_special_tokens=False).endswith("\n")}
    return [i + 1 for i, t in enumerate(ids) if t in newline_ids]


def _nearest(starts: list[int], target: int) -> int:
    return min(starts, key=lambda s: abs(s - target))


def needle_cases(tokenizer, hay: list[int], contexts: list[int], depths: list[float], kinds: list[str],
                 haystacks: int = 1, seed: int = 0, segment_stride: int = 9000,
                 reserve: int = 16) -> list[NeedleCase]:
    """Cases for every (context, haystack segment, kind, depth); prompt = context - reserve tokens
    (the reserve leaves room for the answer inside a model's trained length / the session's ctx)."""
    rng = random.Random(seed)
    cases = []
    for ctx in contexts:
        for h in range(haystacks):
            for kind in kinds:
                for d_i, depth in enumerate(depths):
                    cases.append(_make_case(tokenizer, hay, ctx, h, kind, depth, d_i, rng, segment_stride, reserve))
    return cases


def _make_case(tokenizer, hay, ctx, h, kind, depth, d_i, rng, stride, reserve) -> NeedleCase:
    keys = [str(rng.randrange(10000, 100000)) for _ in LABELS]
    if kind == "single":
        needles = [(depth, SINGLE_NEEDLE.format(key=keys[0]))]
        question, prefix = SINGLE_QUESTION, SINGLE_ANSWER
        answer = keys[0]
    elif kind == "multi":
        asked = d_i % len(LABELS)
        # the other two needles sit a third and two thirds of the document away (wrapping in 5..95 %)
        spots = [(depth + j / 3 - 0.05) % 0.9 + 0.05 for j in range(len(LABELS))]
        order = [(asked + j) % len(LABELS) for j in range(len(LABELS))]
        needles = [(spots[j], MULTI_NEEDLE.format(label=LABELS[lab], key=keys[lab])) for j, lab in enumerate(order)]
        question = MULTI_QUESTION.format(label=LABELS[asked])
        prefix = MULTI_ANSWER.format(label=LABELS[asked])
        answer = keys[asked]
    else:
        raise ValueError(f"needle kind {kind!r}: use single or multi")
    head, tail = split_template(tokenizer, question, prefix)
    needle_ids = [(d, tokenizer.encode(text + "\n", add_special_tokens=False)) for d, text in needles]
    room = ctx - reserve - len(head) - len(tail) - sum(len(n) for _, n in needle_ids)
    start = (h * stride) % max(1, len(hay) - room)
    base = hay[start:start + room]
    starts = _line_starts(tokenizer, base)
    spots = sorted((_nearest(starts, int(d * len(base))), ids) for d, ids in needle_ids)
    doc, last = [], 0
    for pos, ids in spots:
        doc += base[last:pos] + ids
        last = pos
    doc += base[last:]
    return NeedleCase(name=f"{ctx // 1024}K-h{h}-{kind}-d{round(depth * 100)}", context=ctx, depth=depth,
                      kind=kind, answer=answer, head=head, doc=doc, tail=tail, first=spots[0][0], haystack=h)


def extract_digits(text: str) -> str:
    """The first run of digits in a generated answer ('' if none)."""
    m = re.search(r"\d+", text)
    return m.group(0) if m else ""


def teacher_text_ids(tokenizer, hay: list[int], context: int, continuation: int, offset: int = 50000) -> list[int]:
    """context + continuation tokens of plain text (no chat template), taken from later in the haystack."""
    n = context + continuation
    start = min(offset, max(0, len(hay) - n))
    return hay[start:start + n]
