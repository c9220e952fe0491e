"""offload-chat end to end, through a subprocess, on the real default model; bad input exits 2 in one line."""
import json
import os
import struct
import subprocess
import sys

import pytest

from fixtures_models import write_tiny_checkpoint


def run_cli(*args, stdin: str | None = None, env: dict | None = None, timeout: int = 300):
    return subprocess.run([sys.executable, "-m", "offload.cli.main", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OFFLOAD_NO_PROGRESS": "1", **(env or {})})


def test_one_shot_prompt(smollm2_gguf):
    r = run_cli("-m", str(smollm2_gguf), "-p", "What is the capital of France? Answer in one word.", "-n", "12",
                "--stats")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "offload | model" in r.stderr and '"ms_per_token"' in r.stderr   # banner and --stats go to stderr
    stats = r.stderr.splitlines()[-1]        # one line of JSON, longer than the 80 columns rich would wrap at
    assert len(stats) > 80 and json.loads(stats)["ms_per_token"] > 0
    assert "offload |" not in r.stdout


def test_scripted_interactive_session(smollm2_gguf):
    script = "My name is Ada. Say hello to me.\nWhat is my name?\n/reset\nWhat is 2 + 2?\n/exit\nnever read\n"
    r = run_cli("-m", str(smollm2_gguf), "-n", "16", stdin=script)
    assert r.returncode == 0, r.stderr
    answers = [line for line in r.stdout.splitlines() if line.strip()]
    assert len(answers) == 3          # three turns answered; nothing after /exit
    assert "4" in answers[-1]
    assert "(conversation reset)" in r.stderr


def test_document_file_goes_into_context(smollm2_gguf, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("Inventory note: the blue crate holds exactly 7 lanterns.\n")
    r = run_cli("-m", str(smollm2_gguf), "-f", str(doc), "-p", "How many lanterns does the blue crate hold?", "-n", "16")
    assert r.returncode == 0, r.stderr
    assert "7" in r.stdout


def _assert_one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n.lower() in lines[0].lower(), lines[0]
    assert r.stdout == ""


def test_bad_inputs_exit_2_with_one_line(tmp_path):
    empty_cache = tmp_path / "hf-empty"
    empty_cache.mkdir()
    not_model = tmp_path / "not-a-model"
    not_model.mkdir()
    (not_model / "notes.txt").write_text("hello")
    tiny = write_tiny_checkpoint(tmp_path, "llama")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((tiny.path / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{not json")
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\x00" * 10)
    env = {"HF_HUB_CACHE": str(empty_cache), "OFFLOAD_OFFLINE": "1"}
    cases = [
        (["-m", str(tmp_path / "missing-dir"), "-p", "x"], ["missing-dir"]),
        (["-m", str(not_model), "-p", "x"], ["not-a-model"]),
        (["-m", str(corrupt), "-p", "x"], ["safetensors"]),
        (["-m", str(truncated), "-p", "x"], ["cut.gguf"]),
        (["-m", "no-such-alias-xyz", "-p", "x"], ["no-such-alias-xyz"]),
        (["-m", "llama3-8b", "-p", "x"], ["llama3", str(empty_cache)]),
        (["--ctx", "12X", "-p", "x"], ["12X"]),
        (["--gpu-mem", "lots", "-p", "x"], ["lots"]),
        (["--ctx", "0", "-p", "x"], ["--ctx must be positive"]),
        (["--ctx", "-5", "-p", "x"], ["-5"]),
        (["--temperature", "abc", "-p", "x"], ["temperature"]),
        (["--config", str(tmp_path / "nope.yaml"), "-p", "x"], ["nope.yaml"]),
        (["-f", str(tmp_path / "nodoc.txt"), "-p", "x"], ["nodoc.txt"]),
    ]
    for args, needles in cases:
        before = sorted(p.name for p in tmp_path.iterdir())
        _assert_one_line_error(run_cli(*args, env=env, timeout=120), *needles)
        assert sorted(p.name for p in tmp_path.iterdir()) == before   # nothing written


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU error")
def test_device_cuda_without_gpu():
    _assert_one_line_error(run_cli("--device", "cuda", "-p", "x", env={"OFFLOAD_OFFLINE": "1"}), "cuda", "--device cpu")


def test_main_in_process_leaves_sigterm_as_it_was():
    """The CLI turns SIGTERM into a clean exit only while it runs: in-process callers get their handler back."""
    import signal
    from offload.cli.main import main
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with pytest.raises(SystemExit):
        main(["--ctx", "not-a-size"])
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
