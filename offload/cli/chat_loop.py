"""The interactive side of offload-chat: streaming an answer, Ctrl-C, and the /commands.

Ctrl-C while an answer streams stops it after the current token and keeps the conversation (the answer so far
is the turn); a second Ctrl-C, or one at the prompt, exits. Tokens go to stdout, everything else to stderr.
"""
from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading

import click

from offload.errors import OffloadError
from offload.files import utf8_text

HELP = ("/save FILE keeps the conversation (KV and messages), /load FILE resumes one, /stats prints statistics, "
        "/reset starts over, /exit quits; a line ending in \\ continues on the next; Ctrl-C stops an answer")
COMMANDS = ("/save", "/load", "/stats", "/reset", "/exit", "/quit", "/help")


def note(message: str) -> None:
    click.echo(message, err=True)


class Interrupts:
    """While armed: the first SIGINT asks the answer to stop (`requested`), the second raises KeyboardInterrupt.
    Outside (at the prompt) Ctrl-C is Python's own KeyboardInterrupt, i.e. it exits."""

    def __init__(self):
        self.requested = False

    @contextlib.contextmanager
    def armed(self):
        self.requested = False
        if threading.current_thread() is not threading.main_thread():
            yield self          # signals reach only the main thread; an embedding caller keeps its handlers
            return
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)

    def _on_sigint(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        note("\n(stopping the answer; Ctrl-C again exits)")


def answer(chat, text: str, interrupts: Interrupts | None = None) -> str:
    """Stream one answer to stdout; then a note on stderr when it was cut (Ctrl-C, -n, a full context).
    Returns why it ended: "stop", "length", "interrupted" or "context"."""
    interrupts = interrupts or Interrupts()
    stream = chat.stream(text)
    try:
        with interrupts.armed():
            for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
                if interrupts.requested:
                    break
    finally:
        stream.close()          # the chat records the answer so far as the turn (offload.chat.Chat.stream)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if interrupts.requested:
        note("(answer stopped; the conversation keeps it)")
        return "interrupted"
    reason = getattr(chat, "finish_reason", None)
    if reason == "length":
        llm = chat.llm
        if chat.session.length >= llm.ctx - 1:
            note(f"(answer cut: the context is full at --ctx {llm.ctx}; /reset, or run with a larger --ctx)")
            return "context"
        note(f"(answer cut at the -n limit of {llm.sampling().max_tokens} tokens; raise -n for longer answers)")
        return "length"
    return reason or "stop"


def read_message(tty: bool) -> str | None:
    """One message from stdin (lines ending in a backslash continue it); None at end of input."""
    parts = []
    while True:
        if tty:
            click.echo("> " if not parts else ". ", nl=False, err=True)
        raw = sys.stdin.buffer.readline() if hasattr(sys.stdin, "buffer") else sys.stdin.readline()
        if not raw:
            return "\n".join(parts) if parts else None
        line = utf8_text(raw, "a line of input").rstrip("\r\n")
        if line.endswith("\\"):
            parts.append(line[:-1])
            continue
        parts.append(line)
        return "\n".join(parts)


def interactive(chat, document: str | None):
    """The chat loop; returns the chat in use at the end (a /load replaces it)."""
    tty = sys.stdin.isatty()
    if tty:
        note("Type a message; " + HELP + ".")
    interrupts = Interrupts()
    while True:
        message = read_message(tty)
        if message is None:
            return chat
        text = message.strip()
        if not text:
            continue
        word, _, arg = text.partition(" ")
        if word in COMMANDS:
            if word in ("/exit", "/quit"):
                return chat
            chat = _command(chat, word, arg.strip())
            continue
        if word.startswith("/") and word[1:].isalpha():
            note(f"unknown command {word}; {HELP}")
            continue
        answer(chat, text if document is None else f"{document}\n\n{text}", interrupts)
        document = None  # the document goes into the first message only


def _command(chat, word: str, arg: str):
    if word == "/help":
        note(HELP)
    elif word == "/reset":
        chat.reset()
        note("(conversation reset)")
    elif word == "/stats":
        sys.stderr.write(json.dumps(chat.llm.stats, default=str) + "\n")
        sys.stderr.flush()
    elif not arg:
        note(f"error: {word} needs a file name; e.g. {word} chat.offload")
    elif word == "/save":
        try:
            chat.save(arg)
            note(f"(saved {len(chat.messages)} messages and {chat.session.length} tokens of KV to {arg})")
        except OffloadError as e:
            note(f"error: {e}")
    else:
        chat = _load(chat, arg)
    return chat


def _load(chat, path: str):
    """Replace the conversation with a saved one; on failure the current one stays (unless memory forced it out)."""
    from offload.errors import CapacityError
    llm = chat.llm
    try:
        loaded = llm.load_chat(path)
    except CapacityError:
        chat.close()     # no room for both: the user asked for the saved one, so this one goes first
        try:
            loaded = llm.load_chat(path)
        except OffloadError as e:
            note(f"error: {e} (the previous conversation was closed to make room; starting a new one)")
            return llm.chat(system=chat.system)
    except OffloadError as e:
        note(f"error: {e}")
        return chat
    chat.close()
    note(f"(loaded {len(loaded.messages)} messages and {loaded.session.length} tokens of KV from {path})")
    return loaded
