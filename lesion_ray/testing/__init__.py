"""Test and demo harness, not part of the product: a real multi-node Ray cluster on loopback
(:mod:`.loopback`) and the multi-node scenarios that run every job kind across it (:mod:`.multinode`,
also ``python -m lesion_ray.testing.multinode``); :func:`wait_for`, the one way its users wait for a condition."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T], timeout_s: float = 180) -> T:
    """``check()``'s first true value, asked every half second; TimeoutError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.5)
    return result
