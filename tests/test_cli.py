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


# ---- issue 15: options, llama.cpp habits, stdin, notices, progress, chat commands, Ctrl-C --------------------
# In-process runs on a tiny random checkpoint with a byte-level tokenizer and a chat template (loads in < 1 s).
import io  # noqa: E402
import signal  # noqa: E402

from offload.cli.chat_loop import Interrupts, answer  # noqa: E402
from offload.cli.main import main  # noqa: E402
from offload.cli.options import screen_llama_flags  # noqa: E402


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    from offload.model.tokenizer import byte_level_tokenizer
    tiny = write_tiny_checkpoint(tmp_path_factory.mktemp("chat"), "llama")
    tok = byte_level_tokenizer()
    tok.backend.save(str(tiny.path / "tokenizer.json"))
    (tiny.path / "tokenizer_config.json").write_text(json.dumps({"chat_template": tok.chat_template}))
    return str(tiny.path)


def run_main(args, capsys, monkeypatch, stdin: bytes = b""):
    """main(args) in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    code = 0
    try:
        main(list(args))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, out, err, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and out == "" and len(lines) == 1 and lines[0].startswith("error: "), (code, out, err)
    for n in needles:
        assert n.lower() in lines[0].lower(), lines[0]


def test_sampling_and_llama_flag_errors_exit_2_in_one_line(capsys, monkeypatch):
    cases = [(["--top-k", "-3"], ["--top-k"]), (["--min-p", "2"], ["--min-p"]),
             (["--repeat-penalty", "0"], ["--repetition-penalty"]), (["--presence-penalty", "5"], ["presence"]),
             (["--stop", ""], ["stop string"]), (["--temp", "x"], ["--temp"]), (["--top-k", "1.5"], ["top-k"]),
             (["--mirostat", "2"], ["--mirostat", "--top-k"]), (["-ctk", "q8_0"], ["--kv-dtype"]),
             (["-ngl", "99", "--min-p", "-1"], ["--min-p"]),      # the -ngl note waits until options are valid
             (["-hf", "org/x"], ["hf download"]), (["--no-such-flag"], ["no-such-flag"])]
    for args, needles in cases:
        _one_line_error(*run_main(args + ["-p", "x"], capsys, monkeypatch), *needles)
    _one_line_error(*run_main(["-f", "-"], capsys, monkeypatch, stdin=b"  \n"), "stdin")
    _one_line_error(*run_main(["-f", "-", "-p", "x"], capsys, monkeypatch, stdin=b"\xff\xfe bad"), "utf-8")


def test_help_and_option_errors_do_not_import_torch():
    """What makes --help and option errors instant: torch (seconds to import) is never loaded for them."""
    code = ("import sys; from offload.cli.main import main\n"
            "for argv in (['--help'], ['--top-k', '-3'], ['-ngl', '99', '--ctx', '12X'], ['--stop', ''], ['--index', 'x'],\n"
            "             ['--budget', 'p=2'], ['--budget', 'p=0.5,floor=4K,cap=2K']):\n"
            "    try: main(argv)\n"
            "    except SystemExit as e: assert e.code in (0, 2), e.code\n"
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False"


def test_index_choices_are_the_index_methods():
    from offload.cli.main import chat_command
    from offload.indexes import METHODS
    index = next(p for p in chat_command.params if p.name == "index")
    assert tuple(index.type.choices) == ("auto",) + METHODS


def test_llama_cpp_flags_are_screened_without_touching_values():
    valued = {"-p", "--prompt", "-m"}
    argv = ["-ngl", "99", "-p", "-t", "--n-gpu-layers=40", "-fa", "on", "--mlock", "-m", "x", "--flash-attn", "-t", "4"]
    out, notes = screen_llama_flags(argv, valued)
    assert out == ["-p", "-t", "-m", "x"]                # "-t" as the prompt's value stays
    assert [n.split()[1] for n in notes] == ["-ngl", "--n-gpu-layers", "-fa", "--mlock", "--flash-attn", "-t"]
    assert "weights always sit on the GPU" in notes[0]
    assert screen_llama_flags(["--", "-ngl"], valued)[0] == ["--", "-ngl"]


def test_truncation_notice_banner_and_plain_progress_lines(tiny_chat_model, tmp_path, capsys, monkeypatch):
    import offload.progress as progress
    monkeypatch.delenv("OFFLOAD_NO_PROGRESS", raising=False)
    # stderr is not a terminal here: plain lines; 0 s prints every update (a 0.05 s period printed nothing when
    # a quiet machine prefilled the prompt faster than that)
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("prefill_chunk: 32\n")                     # the prompt spans chunks, so prefill reports
    code, out, err = run_main(["-m", tiny_chat_model, "--device", "cpu", "--config", str(cfg), "-n", "3", "-ngl", "9",
                               "-p", "a question " * 20, "--temp", "0", "--ctx-size", "384", "-s", "42"],
                              capsys, monkeypatch)
    assert code == 0, err
    assert "note: -s is the system prompt here ('42'); llama.cpp's seed is --seed" in err
    assert "| ctx 384 |" in err                                  # llama.cpp's --ctx-size is -c/--ctx
    assert "(answer cut at the -n limit of 3 tokens; raise -n" in err
    assert "note: -ngl ignored: weights always sit on the GPU" in err
    banner = next(line for line in err.splitlines() if line.startswith("offload |"))
    assert "device CPU" in banner and "weights" in banner and "CPU RAM" in banner and "GPU" not in banner
    prefill = [line for line in err.splitlines() if line.startswith("prefill ")]
    assert prefill and "tok/s" in prefill[-1] and "eta" in prefill[-1] and "100.0%" in prefill[-1]


def _wait_for(cond, timeout: float = 30.0) -> None:
    """Poll until cond() holds (a fixed sleep races a loaded machine's thread scheduling)."""
    import time
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_load_lines_keep_coming_while_one_step_is_long():
    """Reading a big file is one step of the load: a non-terminal stderr still gets a line every few seconds."""
    from offload.progress import StepLines
    out = io.StringIO()
    lines = StepLines("loading m", 3, out, every=0.02)
    lines(1)
    _wait_for(lambda: len(out.getvalue().splitlines()) >= 2)    # one long step, no updates: lines keep coming
    lines.finish()
    got = out.getvalue().splitlines()
    assert len(got) >= 3 and got[0].startswith("loading m: 1/3 steps (33%), ")
    assert got[-1].startswith("loading m: 3/3 steps (100%)")
    quiet = io.StringIO()
    fast = StepLines("loading m", 3, quiet, every=60)
    fast(3)
    fast.finish()
    assert quiet.getvalue() == ""                               # a quick load prints nothing
    timed = io.StringIO()
    reading = StepLines("reading m", None, timed, every=0.02)   # no steps (the model's metadata): the time only
    _wait_for(lambda: timed.getvalue())
    reading.finish()
    reading.finish()                                            # stopping twice is harmless
    assert timed.getvalue().splitlines()[0].startswith("reading m: 0m00s")


def test_stdin_document_and_stop_strings(tiny_chat_model, capsys, monkeypatch):
    base = ["-m", tiny_chat_model, "--device", "cpu", "-n", "24", "--stats"]
    code, full, err = run_main(base + ["-p", "hi"], capsys, monkeypatch)
    assert code == 0, err
    text = full[:-1]                                          # the answer, then a newline
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert len(stop) == 2
    code, cut, err = run_main(base + ["-p", "hi", "--stop", stop], capsys, monkeypatch)
    assert code == 0 and cut == text[:text.find(stop)] + "\n"
    assert "answer cut" not in err                            # a stop string is not a truncation
    doc = "a document line\n" * 8
    stats = lambda e: json.loads(e.strip().splitlines()[-1])  # noqa: E731
    code, _, err = run_main(base + ["-p", "hi", "-f", "-"], capsys, monkeypatch, stdin=doc.encode())
    with_doc = stats(err)["tokens"]
    code, _, err = run_main(base + ["-f", "-"], capsys, monkeypatch, stdin=doc.encode())   # stdin is the message
    assert code == 0 and stats(err)["tokens"] >= len(doc) and with_doc >= len(doc) + 2


def test_chat_commands_save_load_stats(tiny_chat_model, tmp_path, capsys, monkeypatch):
    saved = tmp_path / "talk.offload"
    script = f"first\\\nline two\n/save {saved}\n/reset\n/load {saved}\n/stats\n/bogus\nsecond\n/load {tmp_path}/no\n/exit\n"
    code, out, err = run_main(["-m", tiny_chat_model, "--device", "cpu", "-n", "4"], capsys, monkeypatch,
                              stdin=script.encode())
    assert code == 0, err
    assert saved.is_file() and "(saved 2 messages" in err and "(loaded 2 messages" in err
    stats_line = next(line for line in err.splitlines() if line.startswith("{"))
    assert json.loads(stats_line)["tokens"] > len("first\nline two")     # the continued line was one message
    assert "unknown command /bogus" in err and "error: " in err         # a bad /load is one line; the chat goes on
    assert len([line for line in out.splitlines()]) == 2                 # two answers


class _Stream:
    """A chat whose answer is pieces; SIGINT arrives while piece `at` is written."""

    def __init__(self, pieces, kills):
        self.pieces, self.kills, self.closed, self.finish_reason = pieces, kills, False, None

    def stream(self, text):
        try:
            for i, p in enumerate(self.pieces):
                for _ in range(self.kills.get(i, 0)):
                    os.kill(os.getpid(), signal.SIGINT)
                yield p
        finally:
            self.closed = True


def test_ctrl_c_stops_the_answer_and_a_second_exits(capsys):
    chat = _Stream(["a", "b", "c", "d"], {1: 1})
    assert answer(chat, "q", Interrupts()) == "interrupted"
    out, err = capsys.readouterr()
    assert out == "ab\n" and chat.closed and "(answer stopped; the conversation keeps it)" in err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler    # Ctrl-C at the prompt exits again
    chat = _Stream(["a", "b", "c"], {1: 2})
    with pytest.raises(KeyboardInterrupt):
        answer(chat, "q", Interrupts())
    assert chat.closed


def test_ctrl_c_keeps_the_conversation(tiny_chat_model, capsys, monkeypatch):
    from offload import LLM
    llm = LLM(tiny_chat_model, device="cpu", max_new_tokens=12)
    chat = llm.chat()
    writes = []

    class KillingStdout(io.StringIO):
        def write(self, s):
            writes.append(s)
            if len(writes) == 2:
                os.kill(os.getpid(), signal.SIGINT)
            return len(s)

    monkeypatch.setattr(sys, "stdout", KillingStdout())
    assert answer(chat, "hello", Interrupts()) == "interrupted"
    partial = "".join(writes[:2])
    assert chat.messages[-1] == {"role": "assistant", "content": partial}
    reply = chat.send("and again")                          # the KV and the text still agree: the chat goes on
    assert chat.messages[-1]["content"] == reply and len(chat.messages) == 4
    llm.close()


def test_index_ann_without_faiss_is_one_line(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)          # import faiss -> ImportError
    monkeypatch.delitem(sys.modules, "offload.indexes.ann", raising=False)
    _one_line_error(*run_main(["--index", "ann", "-p", "x"], capsys, monkeypatch), "offload[ann]")
    monkeypatch.delitem(sys.modules, "offload.indexes.ann", raising=False)
