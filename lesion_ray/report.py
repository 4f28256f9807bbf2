"""What a user sees while a job runs: progress lines on long work and a closing summary."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def info(message: str) -> None:
    """One progress line, flushed at once (jobs may run under Ray's log streaming)."""
    print(f"[lesion-ray] {message}", file=sys.stderr, flush=True)


def progress(items: Iterable[T], total: int | None, label: str, every_s: float = 5.0) -> Iterator[T]:
    """Yield ``items``, printing count, share and rate at most every ``every_s`` seconds."""
    start = last = time.monotonic()
    for done, item in enumerate(items, start=1):
        yield item
        now = time.monotonic()
        if now - last >= every_s or done == total:
            last = now
            rate = done / max(now - start, 1e-9)
            share = f"/{total} ({100 * done / total:.0f}%)" if total else ""
            info(f"{label}: {done}{share}, {rate:.1f}/s")


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
