"""What every fuzz property shares (tests/unit/test_fuzz_*.py, bench/fuzz.py): hypothesis profiles,
an event loop that fails on any exception it would only have logged, and byte-stream mutations.

Profiles (``MESHKEEPER_FUZZ`` selects one; tests/conftest.py loads it):

- ``ci`` (the default): derandomized, so a run is the same on every machine; no example database
  (nothing written to the work tree); no deadline (a loaded CI machine is slow, not wrong). Each
  property runs the number of examples it names with :func:`fuzz_settings`.
- ``long``: random seeds and ``MESHKEEPER_FUZZ_EXAMPLES`` examples per property (default 100,000),
  for a long run by hand (``MESHKEEPER_FUZZ=long pytest tests/unit/test_fuzz_http1*.py``);
  bench/fuzz.py runs the same properties without the engine's shrinking, by the million.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from sidecar.proxy import errors

PROFILE = os.environ.get("MESHKEEPER_FUZZ", "ci")
LONG_EXAMPLES = int(os.environ.get("MESHKEEPER_FUZZ_EXAMPLES", "100000"))

settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "long", derandomize=False, database=None, deadline=None, print_blob=True, max_examples=LONG_EXAMPLES,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def load_profile() -> None:
    if PROFILE not in ("ci", "long"):
        raise SystemExit(f"MESHKEEPER_FUZZ={PROFILE!r}: expected ci or long")
    settings.load_profile(PROFILE)


def fuzz_settings(examples: int) -> settings:
    """Settings of one property: ``examples`` of them in the suite, the long profile's count else."""
    parent = settings.get_profile(PROFILE)
    return settings(parent, max_examples=examples if PROFILE == "ci" else LONG_EXAMPLES)


def tally(what: str) -> None:
    """Count ``what`` in hypothesis' statistics (``--hypothesis-show-statistics``), when in a test."""
    if currently_in_test_context():
        event(what)


# --- an event loop that hides nothing ---------------------------------------------------------


class _BugLog(logging.Handler):
    """Keeps the records that carry an exception (a bug logged instead of raised) and silences the rest."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.bugs: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.bugs.append(self.format(record))


def run_checked(make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run ``make()`` on a fresh event loop and return its result; fail on any exception the loop's
    exception handler saw (a callback's or an abandoned task's) or that the mesh logged with a
    traceback. The data path logs each cause once per process (``errors.log_once``): forgotten here
    so that every example is judged alike."""
    errors._logged.clear()
    seen: list[str] = []
    bug_log = _BugLog()
    logger = logging.getLogger("meshkeeper")
    logger.addHandler(bug_log)
    propagate, logger.propagate = logger.propagate, False
    loop = asyncio.new_event_loop()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        seen.append(f"{context.get('message')}: {exc!r}")

    loop.set_exception_handler(handler)
    try:
        result = loop.run_until_complete(make())
        # Callbacks scheduled by the last step (connection_lost of closed transports) run too.
        loop.run_until_complete(asyncio.sleep(0))
    finally:
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
        logger.removeHandler(bug_log)
        logger.propagate = propagate
    assert not seen, f"the event loop's exception handler was called: {seen}"
    assert not bug_log.bugs, f"an exception was logged: {bug_log.bugs}"
    return result


# --- byte streams -----------------------------------------------------------------------------

# Bytes that change how an HTTP/1.1 parser frames a message, inserted by mutations.
SPECIAL = (b"\r", b"\n", b"\r\n", b"\r\n\r\n", b"\x00", b" ", b"\t", b":", b";", b",", b"0\r\n\r\n",
           b"\r\n ", b"Transfer-Encoding: chunked\r\n", b"Content-Length: 3\r\n", b"Host: svc\r\n",
           b"Connection: close\r\n", b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n", b"\xff", b"\x7f")


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` after one to four random edits: a byte replaced, framing bytes inserted, a range
    deleted or repeated, the end cut off."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(out)))
        op = draw(st.sampled_from(("replace", "insert", "insert", "delete", "repeat", "truncate")))
        if op == "replace" and at < len(out):
            out[at] = draw(st.integers(0, 255))
        elif op == "insert":
            out[at:at] = draw(st.sampled_from(SPECIAL) | st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del out[at : at + draw(st.integers(1, 8))]
        elif op == "repeat":
            out[at:at] = out[at : at + draw(st.integers(1, 40))]
        elif op == "truncate":
            del out[at:]
    return bytes(out)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut into reads at the offsets ``cuts`` (any order, any value: folded into range)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False) if b > a] or [data]


def cuts(max_cuts: int = 8) -> st.SearchStrategy[list[int]]:
    """Where a byte stream is cut into reads."""
    return st.lists(st.integers(0, 1 << 16), max_size=max_cuts)
