"""What a user sees while a job runs: progress lines on long work and a closing summary."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


PREFIX = "[lesion-ray]"
BAR_WIDTH = 24
_bar_shown = False  # a live progress bar occupies the terminal's last line


def info(message: str) -> None:
    """One progress line, flushed at once (jobs may run under Ray's log streaming)."""
    # Written to the stream, not print()ed: Ray Train patches print in its workers to log through the root
    # logger as well, which would show every line of a Train worker twice.
    _write(f"{PREFIX} {message}\n")


def _write(text: str) -> None:
    global _bar_shown
    if _bar_shown:
        text = "\r\x1b[K" + text  # a line printed while a bar is live replaces it; the bar redraws below
    _bar_shown = not text.endswith("\n")
    sys.stderr.write(text)
    sys.stderr.flush()


def progress(items: Iterable[T], total: int | None, label: str, every_s: float | None = None) -> Iterator[T]:
    """Yield ``items``, showing count, share and rate: in a terminal a live bar, redrawn a few times a
    second; elsewhere (a submitted job, CI) a line every ``every_s`` seconds (default 5) and at the end."""
    live = sys.stderr.isatty()
    every_s = every_s if every_s is not None else (0.2 if live else 5.0)
    start = last = time.monotonic()
    done = 0
    for done, item in enumerate(items, start=1):
        yield item
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            _show(label, done, total, now - start, live)
    _show(label, done, total, time.monotonic() - start, live, end=True)


def _show(label: str, done: int, total: int | None, seconds: float, live: bool, end: bool = False) -> None:
    share = f"/{total} ({100 * done / total:.0f}%)" if total else ""
    text = f"{label}: {done}{share}, {done / max(seconds, 1e-9):.1f}/s"
    if not live:
        info(text)
        return
    filled = round(BAR_WIDTH * done / total) if total else 0
    bar = f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] " if total else ""
    _write(f"\r\x1b[K{PREFIX} {bar}{text}" + ("\n" if end else ""))


def format_summary(title: str, summary: dict[str, Any]) -> str:
    """A short aligned block of ``key: value`` lines under a title."""
    lines = [f"== {title} =="]
    width = max((len(k) for k in summary), default=0)
    for key, value in summary.items():
        if isinstance(value, float):
            value = f"{value:.4f}"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items())
        lines.append(f"  {key.ljust(width)} : {value}")
    return "\n".join(lines)
