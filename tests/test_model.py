"""The runtime's logits against transformers: tiny random checkpoints and the real SmolLM2 GGUF."""
import pydoc_data.topics
import pytest
import torch

from fixtures_models import write_tiny_checkpoint
from offload import LLM

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}
CASES = {
    "llama": ("llama", {}),
    "llama3-rope": ("llama", {"rope_scaling": LLAMA3_SCALING}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
}


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None]).logits[0].float()  # [T, V]


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    arch, overrides = CASES[case]
    tiny = write_tiny_checkpoint(tmp_path, arch, **overrides)
    ids = torch.randint(0, tiny.model.config.vocab_size, (96,), generator=torch.Generator().manual_seed(1))
    ref = hf_logits(tiny.model, ids)  # ref: [96, V]
    llm = LLM(str(tiny.path), device="cpu", ctx=256, prefill_chunk=32)
    sess = llm.session()
    diffs = [(sess.prefill(ids[:64].tolist()) - ref[63]).abs().max()]
    for t in range(64, 96):
        diffs.append((sess.step(int(ids[t])) - ref[t]).abs().max())
    assert max(diffs) <= 1e-4, f"{case}: max abs diff {max(diffs):.2e}"


def test_chunked_prefill_equals_one_shot(tmp_path):
    tiny = write_tiny_checkpoint(tmp_path, "llama")
    ids = torch.randint(0, tiny.model.config.vocab_size, (150,), generator=torch.Generator().manual_seed(2)).tolist()
    one = LLM(str(tiny.path), device="cpu", ctx=256, prefill_chunk=4096).session()
    many = LLM(str(tiny.path), device="cpu", ctx=256, prefill_chunk=17).session()
    a, b = one.prefill(ids), many.prefill(ids)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(one.step(5), many.step(5), rtol=0, atol=1e-5)


def test_long_chunks_run_their_mlp_in_row_pieces_with_the_same_logits(tmp_path, monkeypatch):
    """A prefill chunk longer than MLP_ROWS gets its attention whole and its dense part in row pieces (memory):
    the logits still equal transformers', after a first call and after a second that attends its history."""
    import offload.model.llama as llama
    tiny = write_tiny_checkpoint(tmp_path, "llama")
    ids = torch.randint(0, tiny.model.config.vocab_size, (100,), generator=torch.Generator().manual_seed(3))
    ref = hf_logits(tiny.model, ids)  # ref: [100, V]
    monkeypatch.setattr(llama, "MLP_ROWS", 7)
    pieces = []
    real = llama.LlamaModel.attn_output_mlp

    def spy(self, i, x, o):
        pieces.append(x.shape[0])
        return real(self, i, x, o)
    monkeypatch.setattr(llama.LlamaModel, "attn_output_mlp", spy)
    sess = LLM(str(tiny.path), device="cpu", ctx=256, prefill_chunk=4096).session()
    for start, end in ((0, 50), (50, 100)):     # two calls: the second attends a history
        got = sess.prefill(ids[start:end].tolist())
        torch.testing.assert_close(got, ref[end - 1], rtol=0, atol=1e-4)
    assert max(pieces) == 50 and min(pieces) <= 7    # the whole chunk came in, and was cut into 7-row pieces


def test_greedy_generation_matches_transformers(tmp_path):
    tiny = write_tiny_checkpoint(tmp_path, "qwen2")
    prompt = torch.randint(0, tiny.model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = tiny.model.generate(prompt[None], attention_mask=torch.ones(1, 40, dtype=torch.long), max_new_tokens=32,
                                  min_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 40:].tolist()
    llm = LLM(str(tiny.path), device="cpu", ctx=128)
    sess = llm.session()
    got = list(sess.generate_ids(prompt.tolist(), max_new_tokens=32, temperature=0.0, top_p=1.0, seed=None))
    assert got == ref


def haystack_text(n_chars: int) -> str:
    topics = pydoc_data.topics.topics
    return "\n".join(topics[k] for k in sorted(topics))[:n_chars]


def test_smollm2_gguf_matches_transformers(smollm2_gguf, smollm2_transformers):
    llm = LLM(str(smollm2_gguf), device="cpu", ctx=2048)
    ids = llm.tokenizer.encode(haystack_text(2400))[:500]
    assert len(ids) == 500
    ref = hf_logits(smollm2_transformers[0], torch.tensor(ids))  # ref: [500, V]
    sess = llm.session()
    got = sess.prefill(ids[:490])
    diffs = [(got - ref[489]).abs().max()]
    for t in range(490, 500):
        diffs.append((sess.step(ids[t]) - ref[t]).abs().max())
    assert max(diffs) <= 2e-3, f"max abs diff {max(diffs):.2e}"
