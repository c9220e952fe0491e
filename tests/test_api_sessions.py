"""Several sessions and chats per LLM (each owns its KV, the tier budget is shared), Chat.save/load,
generate(list) and SamplingParams in the API, on a tiny random checkpoint that can chat (byte tokenizer)."""
from __future__ import annotations

import json

import pytest
import torch

from fixtures_models import write_tiny_checkpoint
from offload import LLM
from offload.engine.sampling import SamplingParams
from offload.errors import CapacityError, ConfigError, SessionFileError

LETTERS = [32] + list(range(97, 123))      # " a..z": what the chat checkpoint's head can say


def write_chat_checkpoint(folder, max_position_embeddings: int = 4096):
    """A tiny random llama that chats: a byte-level tokenizer.json, a plain chat template, and an LM head that
    only ever picks a letter or a space (rows of other ids are zero, the letters' rows large), so answers are
    ASCII text that tokenizes back to the same ids."""
    from offload.model.tokenizer import byte_level_tokenizer
    ckpt = write_tiny_checkpoint(folder, "llama", max_position_embeddings=max_position_embeddings)
    with torch.no_grad():
        w = ckpt.model.lm_head.weight                     # w: [V, H]
        keep = torch.zeros(w.shape[0], dtype=torch.bool)
        keep[LETTERS] = True
        w[~keep] = 0
        w[keep] *= 50
    ckpt.model.save_pretrained(ckpt.path, safe_serialization=True)
    tok = byte_level_tokenizer()
    tok.backend.save(str(ckpt.path / "tokenizer.json"))
    (ckpt.path / "tokenizer_config.json").write_text(json.dumps({"chat_template": tok.chat_template}))
    return ckpt.path


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return write_chat_checkpoint(tmp_path_factory.mktemp("chatmodel"))


@pytest.fixture(scope="module")
def llm(chat_model):
    return LLM(str(chat_model), device="cpu", ctx=1024)


def _same_kv(llm, sess) -> None:
    """sess's KV holds exactly sess.tokens: a fresh prefill of them gives the same next-step logits."""
    assert sess.length == len(sess.tokens)
    fresh = llm.session()
    fresh.prefill(sess.tokens)
    torch.testing.assert_close(fresh.step(97), sess.fork().step(97), rtol=0, atol=1e-5)
    fresh.close()


def test_chats_and_sessions_each_own_their_kv(llm):
    a, b = llm.chat(system="terse"), llm.chat()
    raw = llm.session()
    raw.prefill(llm.tokenizer.encode("some raw context"))
    first = a.send("hello there", max_new_tokens=6)
    b.send("another chat", max_new_tokens=5)
    assert llm.generate("a completion in between", max_new_tokens=3)
    second = a.send("and again", max_new_tokens=6)
    assert len(first) == 6 and set(first + second) <= {chr(i) for i in LETTERS}
    assert [m["role"] for m in a.messages] == ["system", "user", "assistant", "user", "assistant"]
    for sess in (a.session, b.session, raw):
        _same_kv(llm, sess)
    a.close(), b.close(), raw.close()


def test_the_tier_budget_is_shared_and_a_session_that_cannot_fit_is_refused(chat_model):
    per_session = LLM(str(chat_model), device="cpu", ctx=256).plan.gpu_bytes     # the whole KV of ctx 256
    llm = LLM(str(chat_model), device="cpu", ctx=256, gpu_mem=2 * per_session + 1000, host_mem=0)
    assert llm.plan.gpu_bytes == per_session
    one, two = llm.session(), llm.chat()
    with pytest.raises(CapacityError, match=r"a new session needs .* of GPU KV but the 2 open session\(s\) hold .* "
                                            r"GPU budget; close one") as e:
        llm.session()
    assert "\n" not in str(e.value)
    one.prefill([1, 2, 3])                            # the open ones are untouched
    two.close()
    three = llm.session()                             # room again once one is closed
    three.prefill([4, 5])
    assert one.length == 3 and three.length == 2


def test_chat_save_and_load_resume_the_conversation(llm, chat_model, tmp_path):
    chat = llm.chat(system="be brief")
    chat.send("first question", max_new_tokens=5)
    path = tmp_path / "chat.offload"
    chat.save(path)
    expect = chat.send("second question", max_new_tokens=7)
    other = LLM(str(chat_model), device="cpu", ctx=1024)     # a later process, say
    resumed = other.load_chat(path)
    assert resumed.messages == chat.messages[:3] and resumed.system == "be brief"
    n = resumed.session.length
    assert resumed.send("second question", max_new_tokens=7) == expect
    assert resumed.session.tokens == chat.session.tokens and resumed.session.length > n
    sess = llm.session()
    sess.prefill([5, 6, 7])
    sess.save(tmp_path / "plain.offload")
    with pytest.raises(SessionFileError, match="holds no saved chat"):
        other.load_chat(tmp_path / "plain.offload")


def test_a_chat_stopped_early_keeps_its_turn(llm):
    chat = llm.chat()
    stream = chat.stream("talk for a while", max_new_tokens=50)
    got = [next(stream), next(stream), next(stream)]
    stream.close()                                     # the caller stops (Ctrl-C, a closed HTTP stream)
    assert chat.messages[-1] == {"role": "assistant", "content": "".join(got)}
    _same_kv(llm, chat.session)
    assert chat.send("go on", max_new_tokens=4)


def test_generate_a_list_and_sampling_params(llm):
    prompts = ["one prompt", "another prompt", "a third"]
    want = [llm.generate(p, max_new_tokens=4) for p in prompts]
    assert llm.generate(prompts, max_new_tokens=4) == want
    params = SamplingParams(temperature=0.9, top_k=5, seed=3, max_tokens=6)
    got = llm.generate(prompts[:2], [params, params.override(seed=4)])
    assert got[0] == llm.generate(prompts[0], params) and len(got[1]) == 6
    with pytest.raises(ConfigError, match="3 prompts but 2 sampling_params"):
        llm.generate(prompts, [params, params])
    with pytest.raises(ConfigError, match="top_k must be >= 0"):
        llm.generate("x", top_k=-5)


def test_stop_strings_end_the_text_and_say_why(llm):
    full = llm.generate("stop here", max_new_tokens=30)
    cut = full[5:8]
    sess = llm.session()
    text = "".join(sess.generate_text(llm.tokenizer.encode("stop here"), stop=[cut], max_tokens=30))
    assert text == full[:full.index(cut)] and sess.finish_reason == "stop"
    sess.close()
    sess = llm.session()
    assert "".join(sess.generate_text(llm.tokenizer.encode("stop here"), max_tokens=30)) == full
    assert sess.finish_reason == "length"
