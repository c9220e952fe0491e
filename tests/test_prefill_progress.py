"""Prefill progress on stderr (plain lines when not a terminal) and the planner's prefill-time estimate."""
import io
import re

import pytest
import torch

from offload import progress

LINE = re.compile(r"^prefill (\d+)/(\d+) tokens ([\d.]+)% (\d+) tok/s elapsed (\d+)m(\d\d)s eta (\d+)m(\d\d)s$")


def test_lines_are_parsable_and_monotonic():
    out = io.StringIO()
    p = progress.PrefillProgress(1000, 4, stream=out, every=0.0, attn_per_matmul=1e-3)
    for layer in range(4):
        for e in range(250, 1001, 250):
            p(layer * 1000 + e, 4000)
    lines = out.getvalue().splitlines()
    assert len(lines) == 16
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    done = [int(m.group(1)) for m in parsed]
    assert done == sorted(done) and done[-1] == 1000 and int(parsed[-1].group(2)) == 1000
    assert float(parsed[-1].group(3)) == 100.0


def test_fraction_weights_later_chunks_by_their_attention():
    p = progress.PrefillProgress(1000, 1, attn_per_matmul=1.0)   # attention dominates: cost ~ e^2
    assert p.fraction(500, 1000) == pytest.approx((500 + 500 ** 2 / 2) / (1000 + 1000 ** 2 / 2))
    assert progress.PrefillProgress(1000, 1).fraction(500, 1000) == 0.5   # no attention term: linear


def test_prefill_flops_and_estimate_for_the_8b_architecture():
    from offload.model.loaders.build import arch_config
    from offload.model.config import ModelConfig
    mc = ModelConfig.from_hf(arch_config("llama3-8b")) if hasattr(ModelConfig, "from_hf") else None
    if mc is None:
        pytest.skip("no ModelConfig.from_hf")
    n = 1 << 20
    params = progress.matmul_params(mc)
    assert 6.9e9 < params < 7.1e9        # Llama-3-8B without the embedding lookup
    want = 2 * params * n + 4 * 32 * 32 * 128 * n * n / 2
    assert progress.prefill_flops(mc, n) == pytest.approx(want)
    est = progress.estimate_prefill(mc, n, torch.device("cpu"))
    assert est.seconds == pytest.approx(want / 0.3e12)
    assert "estimate" in est.line(n) and "1,048,576 tokens" in est.line(n)


def test_session_prefill_prints_lines_when_stderr_is_not_a_terminal(tmp_path, monkeypatch, capfd):
    from fixtures_models import write_tiny_checkpoint
    from offload import LLM
    tiny = write_tiny_checkpoint(tmp_path)
    monkeypatch.delenv("OFFLOAD_NO_PROGRESS", raising=False)
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)
    monkeypatch.setattr(progress.PrefillProgress.__init__, "__defaults__",
                        (0, None, 0.0, 0.0, None))   # every=0: a line per chunk
    llm = LLM(str(tiny.path), device="cpu", ctx=512, prefill_chunk=32)
    capfd.readouterr()
    llm.session().prefill(list(range(1, 129)))
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("prefill ")]
    assert len(err) >= 4 and all(LINE.match(line) for line in err), err
    assert LINE.match(err[-1]).group(1) == "128"


def test_notes_stay_one_line_when_stderr_is_not_a_terminal(capsys):
    """Banners and notes are one line each in logs and pipes, however long (rich wrapped them at 80 columns)."""
    from offload.progress import note
    long = "offload | model x | " + "KV 0.4 GiB for ctx 8K (32-token chunks): GPU 0.4 + host 0 GiB | " * 3
    note(long)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and long.strip() in err
