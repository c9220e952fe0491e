"""offload-chat: chat with a long-context model whose KV lives in GPU, host RAM and NVMe tiers.

Imports stay light until the model loads (torch takes seconds to import): `--help` and every option error
come back at once, and every option is checked before any weight is read.
"""
from __future__ import annotations

import json
import signal
import sys
import threading
import warnings
from pathlib import Path

import click

from offload.cli.options import (MODEL_OPTIONS, SAMPLING_OPTIONS, _opt, apply_options, build_config,
                                 screen_llama_flags)
from offload.errors import ConfigError, OffloadError
from offload.files import read_utf8, utf8_text

EXIT_BAD_INPUT = 2
STDIN_MAX_BYTES = 1 << 30     # `-f -`: a document from a pipe, read whole before the model loads


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@apply_options(MODEL_OPTIONS)
@_opt("-p", "--prompt", help="Answer this prompt and exit (otherwise: interactive chat).")
@_opt("-f", "--file", "file_", type=click.Path(dir_okay=False, allow_dash=True),
      help="A document to put in the context; - reads it from stdin (then without -p it is the message).")
@_opt("--prompt-cache", help="File keeping the -f document's prefilled KV: the next run with the same model, "
      "options and document resumes it instead of prefilling.")
@_opt("-s", "--system", help="System prompt (llama.cpp's -s is the seed: use --seed).")
@apply_options(SAMPLING_OPTIONS)
@_opt("--config", "config_path", type=click.Path(dir_okay=False), help="YAML file of options (CLI > env OFFLOAD_* > file).")
@click.option("--stats", "show_stats", is_flag=True, help="Print runtime statistics (JSON) to stderr at the end.")
def chat_command(prompt, file_, system, config_path, show_stats, **flags):
    """Chat with a local LLM over a huge context.

    In chat: /save FILE, /load FILE, /stats, /reset, /exit; a line ending in \\ continues; Ctrl-C stops the
    answer and keeps the conversation, twice exits."""
    cfg = build_config(config_path, flags)
    for line in click.get_current_context().obj or ():   # llama.cpp flags we ignore: noted once options are valid
        click.echo(line, err=True)
    document = _read_document(file_) if file_ else None
    prompt = utf8_text(prompt, "--prompt") if prompt is not None else None
    system = utf8_text(system, "--system") if system is not None else None
    if file_ == "-" and prompt is None:
        prompt, document = document, None     # stdin was the document, so it cannot also carry chat messages
        if not prompt.strip():
            raise ConfigError("-f - read nothing from stdin; pipe the text in, or pass -p")
    if system is not None and system.strip().lstrip("-").isdigit():
        click.echo(f"note: -s is the system prompt here ({system!r}); llama.cpp's seed is --seed", err=True)
    if cfg.prompt_cache:
        from offload.prompt_cache import check_path
        check_path(cfg.prompt_cache, document is not None)
    from offload.progress import activity, note
    reading = activity(f"reading {cfg.model}")      # torch's import and the model's metadata: lines, not silence

    def before_load(llm):
        reading()                                    # the weights' own progress takes over from here
        _check_inputs(llm, document, prompt, system)

    try:
        from offload.api import LLM
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # shown once in the banner instead
            llm = LLM(config=cfg, show_progress=None, before_load=before_load)
    finally:
        reading()
    from offload.cli.banner import banner
    from offload.cli.chat_loop import Interrupts, answer, interactive
    note(banner(llm))
    if llm.ctx > llm.model_config.max_position_embeddings:
        note(f"warning: ctx {llm.ctx} exceeds the model's trained length {llm.model_config.max_position_embeddings}")
    chat = llm.chat(system=system)
    try:
        if cfg.prompt_cache and document is not None:
            from offload.prompt_cache import prime_chat
            prime_chat(chat, document, cfg.prompt_cache)
        if prompt is not None:
            answer(chat, _with_document(document, prompt), Interrupts())
        else:
            chat = interactive(chat, document)
    finally:
        if show_stats:   # one line of JSON, never wrapped: rich's console would fold it at the terminal width
            sys.stderr.write(json.dumps(llm.stats, default=str) + "\n")
            sys.stderr.flush()
        llm.close()


def _read_document(path: str) -> str:
    if path == "-":
        stream = sys.stdin.buffer if hasattr(sys.stdin, "buffer") else sys.stdin
        data = stream.read(STDIN_MAX_BYTES + 1)
        if len(data) > STDIN_MAX_BYTES:
            raise ConfigError(f"-f - read more than {STDIN_MAX_BYTES >> 20} MiB from stdin; pass a file instead")
        return utf8_text(data, "the stdin document (-f -)")
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


def _terminate(signum, frame):
    # SIGTERM unwinds like Ctrl-C, so `finally` blocks close the sessions and remove spilled KV files
    raise SystemExit(128 + signum)


def main(argv=None) -> None:
    # only while the command runs: a caller that runs main() in-process (tests, embedding) keeps its own SIGTERM
    ours = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    if ours:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        _run(list(sys.argv[1:] if argv is None else argv))
    finally:
        if ours:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _valued_options() -> set[str]:
    return {name for p in chat_command.params if isinstance(p, click.Option) and not p.is_flag
            for name in p.opts + p.secondary_opts}


def _run(argv: list[str]) -> None:
    try:
        argv, notes = screen_llama_flags(argv, _valued_options())
        chat_command.main(args=argv, prog_name="offload-chat", standalone_mode=False, obj=notes)
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
