"""Polling with a deadline inside a running event loop (tests never sleep to wait for state)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def until(cond: Callable[[], object], limit: float = 2.0, interval: float = 0.002) -> None:
    """Poll ``cond`` every ``interval`` seconds (the loop keeps running meanwhile) until it is true;
    AssertionError after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached in {limit} s")
        await asyncio.sleep(interval)
