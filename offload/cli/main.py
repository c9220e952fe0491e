"""offload-chat: chat with a long-context model whose KV lives in GPU, host RAM and NVMe tiers."""
from __future__ import annotations

import json
import signal
import sys
import threading
import warnings
from pathlib import Path

import click

from offload.config import OffloadConfig, env_overrides, load_yaml
from offload.errors import ConfigError, OffloadError
from offload.files import read_utf8, utf8_text

EXIT_BAD_INPUT = 2


def _opt(*names, **kw):
    return click.option(*names, default=None, show_default=False, **kw)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@_opt("-m", "--model", help="HF folder, .gguf file, alias (llama3-8b, llama3.1-8b, llama3-8b-1m, qwen2.5-7b-1m) "
      "or repo id in the local HF cache. Default: smollm2-135m.")
@_opt("-c", "--ctx", help="Context length in tokens: 8192, 128K, 1M. Default: the model's trained length (max 128K).")
@_opt("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Compute device. Default: auto.")
@_opt("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), help="Weight/KV dtype.")
@_opt("--gpu-mem", help="GPU memory for KV, e.g. 6GiB. Default: detected.")
@_opt("--host-mem", help="Host RAM for KV, e.g. 48GiB. Default: detected.")
@_opt("--disk-mem", help="NVMe space for KV, e.g. 200GB. Default: free space in --disk-dir.")
@_opt("--disk-dir", help="Directory for spilled KV files (created 0700, removed on exit).")
@_opt("--attention", type=click.Choice(["auto", "full", "sparse"]), help="Exact (full) or sparse retrieval attention.")
@_opt("--budget", help="Sparse attention budget per step and KV head: tokens (2K, the default), a mass "
                        "threshold (p=0.75,floor=128,cap=2K) or a fraction (5%).")
@_opt("--index", help="Sparse chunk selection method: summary, shadow or ann.")
@_opt("--kv-dtype", type=click.Choice(["auto", "bf16", "int8", "int4"]),
      help="KV in host RAM and on disk: bf16 (default), int8 or int4 (compressed, lossy; fewer bytes over PCIe), "
      "auto (int8 once KV leaves the GPU).")
@_opt("--select-unit", type=click.Choice(["chunk", "token"]),
      help="Sparse: attend whole chunks (default) or the best tokens of 4x as many candidate chunks.")
@_opt("--prefill", type=click.Choice(["exact", "sparse"]),
      help="Prefill attention: exact (default) or sparse (block-sparse history, faster at 128K+, lossy).")
@_opt("--load-format", type=click.Choice(["auto", "dummy"]), help="dummy = random weights (benchmarks).")
@_opt("-p", "--prompt", help="Answer this prompt and exit (otherwise: interactive chat).")
@_opt("-f", "--file", "file_", type=click.Path(dir_okay=False), help="A document to put in the context.")
@_opt("--prompt-cache", help="File keeping the -f document's prefilled KV: the next run with the same model, "
      "options and document resumes it instead of prefilling.")
@_opt("-s", "--system", help="System prompt.")
@_opt("-n", "--max-new-tokens", type=int, help="Most tokens to generate per answer. Default: 256.")
@_opt("--temperature", type=float, help="0 = greedy (default).")
@_opt("--top-p", type=float, help="Nucleus sampling mass. Default: 1.0.")
@_opt("--seed", type=int, help="Sampling seed.")
@_opt("--config", "config_path", type=click.Path(dir_okay=False), help="YAML file of options (CLI > env OFFLOAD_* > file).")
@click.option("--stats", "show_stats", is_flag=True, help="Print runtime statistics (JSON) to stderr at the end.")
def chat_command(prompt, file_, system, config_path, show_stats, **flags):
    """Chat with a local LLM over a huge context."""
    cfg = build_config(config_path, flags)
    document = _read_document(file_) if file_ else None
    prompt = utf8_text(prompt, "--prompt") if prompt is not None else None
    system = utf8_text(system, "--system") if system is not None else None
    if cfg.prompt_cache:
        from offload.prompt_cache import check_path
        check_path(cfg.prompt_cache, document is not None)
    from offload.api import LLM
    from offload.progress import note

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # shown once in the banner instead
        llm = LLM(config=cfg, show_progress=None, before_load=lambda llm: _check_inputs(llm, document, prompt, system))
    note(banner(llm))
    if llm.ctx > llm.model_config.max_position_embeddings:
        note(f"warning: ctx {llm.ctx} exceeds the model's trained length {llm.model_config.max_position_embeddings}")
    chat = llm.chat(system=system)
    try:
        if cfg.prompt_cache and document is not None:
            from offload.prompt_cache import prime_chat
            prime_chat(chat, document, cfg.prompt_cache)
        if prompt is not None:
            _answer(chat, _with_document(document, prompt))
        else:
            _interactive(chat, document)
    finally:
        if show_stats:   # one line of JSON, never wrapped: rich's console would fold it at the terminal width
            sys.stderr.write(json.dumps(llm.stats, default=str) + "\n")
            sys.stderr.flush()
        llm.close()


def build_config(config_path, flags: dict) -> OffloadConfig:
    values = load_yaml(config_path) if config_path else {}
    values.update(env_overrides())
    values.update({k: v for k, v in flags.items() if v is not None})
    return OffloadConfig(**values)


def banner(llm) -> str:
    plan = llm.plan.summary() if llm.plan is not None else "KV on " + llm.device.type
    from offload.backends import mode
    return (f"offload | model {llm.name} | ctx {llm.ctx} | {llm.device.type} {str(llm.dtype).replace('torch.', '')} "
            f"| attention {mode(llm)} | {plan} | loaded in {llm.load_s:.1f}s")


def _read_document(path: str) -> str:
    return read_utf8(Path(path), "--file", "pass a UTF-8 text file")


def _check_inputs(llm, document: str | None, prompt: str | None, system: str | None) -> None:
    """Before the weights load: the model can chat, and the document and prompt fit the context."""
    if llm.tokenizer is None:
        raise ConfigError("this model has no tokenizer (--load-format dummy, or a folder without tokenizer.json); "
                          "use a model with one, or bench/decode.py")
    if llm.tokenizer.chat_template is None:
        raise ConfigError(f"{llm.name} has no chat template; use an instruct model (offload-chat renders chats), "
                          "or the Python API's llm.generate() for raw completion")
    text = "\n".join(t for t in (system, document, prompt) if t)
    n = len(llm.tokenizer.encode(text, parse_special=False)) if text else 0
    if n >= llm.ctx:
        raise ConfigError(f"the input is {n} tokens but ctx is {llm.ctx}; raise --ctx above {n} "
                          "(e.g. --ctx 128K) or shorten the document")


def _with_document(document: str | None, text: str) -> str:
    return text if document is None else f"{document}\n\n{text}"


def _answer(chat, text: str) -> None:
    for piece in chat.stream(text):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def _interactive(chat, document: str | None) -> None:
    tty = sys.stdin.isatty()
    if tty:
        click.echo("Type a message; /reset starts over, /exit quits.", err=True)
    while True:
        if tty:
            click.echo("> ", nl=False, err=True)
        raw = sys.stdin.buffer.readline() if hasattr(sys.stdin, "buffer") else sys.stdin.readline()
        if not raw:
            break
        line = utf8_text(raw, "a line of input")
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            chat.reset()
            click.echo("(conversation reset)", err=True)
            continue
        _answer(chat, _with_document(document, text))
        document = None  # the document goes into the first message only


def _terminate(signum, frame):
    # SIGTERM unwinds like Ctrl-C, so `finally` blocks close the sessions and remove spilled KV files
    raise SystemExit(128 + signum)


def main(argv=None) -> None:
    # only while the command runs: a caller that runs main() in-process (tests, embedding) keeps its own SIGTERM
    ours = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    if ours:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        _run(argv)
    finally:
        if ours:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _run(argv) -> None:
    try:
        chat_command.main(args=argv, prog_name="offload-chat", standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        message = " ".join(e.format_message().split()).rstrip(".")   # one line, with the fix appended
        click.echo(f"error: {message}; see offload-chat --help", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except OffloadError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
