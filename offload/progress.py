"""Progress bars on stderr (rich), silent when OFFLOAD_NO_PROGRESS=1 or when asked to be quiet."""
from __future__ import annotations

import contextlib
import os
import sys

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

_console = Console(stderr=True)


def enabled() -> bool:
    return os.environ.get("OFFLOAD_NO_PROGRESS") != "1" and sys.stderr.isatty()


@contextlib.contextmanager
def progress_bar(description: str, total: int, show: bool | None = None):
    """Yields update(done, total); a no-op when progress is disabled."""
    if not (enabled() if show is None else show):
        yield lambda done, total=None: None
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=_console, transient=True) as prog:
        task = prog.add_task(description, total=total)
        yield lambda done, total=None: prog.update(task, completed=done, **({"total": total} if total else {}))


def note(message: str) -> None:
    """One line to stderr (banners, warnings)."""
    _console.print(message, highlight=False, markup=False)
