"""The access log: one JSON line per request, buffered, written by a thread of its own.

Like Envoy's file access log, lines are not written one by one: they collect in a buffer that is
handed to a writer thread when it passes ``buffer_limit`` bytes or, at the latest,
``flush_interval`` seconds after the first line went into it (Envoy flushes every second). A
request thus costs the formatting of its line and an append; the event loop never waits for the
disk or for whoever reads stdout. If the writer falls behind by more than ``max_pending`` bytes (a
stalled log shipper on the other end of stdout), further lines are dropped and counted
(``dropped``) instead of holding requests. Writes are cut at line boundaries into pieces of at most
``PIPE_BUF`` bytes, so the lines of several workers sharing one stdout pipe never interleave.

Off by default, as in Istio (``meshConfig.accessLogFile`` empty) and Linkerd: on one worker it
costs about a quarter of the HTTP/1.1 throughput (bench/RESULTS.md, issue 14). ``--access-log -``
writes to stdout, ``--access-log PATH`` appends to a file.

The fields (names as Istio's JSON access log spells them; times in UTC, durations in ms)::

    {"start_time": "2026-11-23T10:00:00.123Z", "method": "GET", "authority": "catalog",
     "path": "/items?id=1", "protocol": "HTTP/1.1", "response_code": 200, "response_flags": "-",
     "bytes_received": 0, "bytes_sent": 512, "duration": 3, "upstream_host": "127.0.0.1:15006",
     "upstream_cluster": "outbound|catalog.default", "route_name": "catalog.default",
     "request_id": "6f1c...", "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "listener": "outbound"}

``trace_id`` is the request's trace, sampled or not ("-" when tracing is off): it finds the trace in
Jaeger when it was sampled and ties the log lines of one request together across services always.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import sys
import threading
from typing import BinaryIO

log = logging.getLogger("meshkeeper.sidecar.accesslog")

FLUSH_INTERVAL = 1.0
BUFFER_LIMIT = 64 * 1024
MAX_PENDING = 4 * 1024 * 1024  # bytes handed to the writer and not yet written
PIPE_BUF = getattr(os, "PIPE_BUF", None) or 4096  # atomic write size of a pipe (POSIX: at least 512)


class AccessLog:
    """Buffered line writer; call :meth:`write` and :meth:`flush` from the event loop's thread only."""

    def __init__(self, stream: BinaryIO, *, flush_interval: float = FLUSH_INTERVAL,
                 buffer_limit: int = BUFFER_LIMIT, max_pending: int = MAX_PENDING, owned: bool = False) -> None:
        self.stream = stream  # written with one write() per chunk: pass an unbuffered (raw) stream
        self._owned = owned  # closed by close()
        self.flush_interval = flush_interval
        self.buffer_limit = buffer_limit
        self.max_pending = max_pending
        self.lines = 0  # handed to the writer
        self.dropped = 0  # lines dropped because the writer was max_pending behind
        self.write_errors = 0  # failed writes (written by the writer thread only)
        self._buf: list[bytes] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._pending = 0  # bytes queued for the writer; the loop adds, the writer subtracts under _lock
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[list[bytes] | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="access-log", daemon=True)
        self._writer.start()

    @classmethod
    def open(cls, target: str) -> AccessLog | None:
        """``-``: stdout; ``off``: no access log (None); anything else: a file appended to."""
        if target == "off":
            return None
        if target == "-":
            sys.stdout.flush()  # what print() buffered goes first; from here on, raw writes
            return cls(getattr(sys.stdout.buffer, "raw", sys.stdout.buffer))  # unbuffered (-u) has no raw
        return cls(open(target, "ab", buffering=0), owned=True)  # noqa: SIM115 - owned until close()

    def write(self, line: bytes) -> None:
        self._buf.append(line)
        self._size += len(line)
        if self._size >= self.buffer_limit:
            self.flush()
        elif self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(self.flush_interval, self.flush)
            except RuntimeError:  # no loop (a unit test): hand it over at once
                self.flush()

    def flush(self) -> None:
        """Hand the buffered lines to the writer thread (or drop and count them if it is too far behind)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._buf:
            return
        lines, size = self._buf, self._size
        self._buf, self._size = [], 0
        with self._lock:
            if self._pending + size > self.max_pending:
                self.dropped += len(lines)
                if self.dropped == len(lines):
                    log.warning("access log writer is behind by %d bytes: dropping lines (counted)", self._pending)
                return
            self._pending += size
        self.lines += len(lines)
        self._queue.put(lines)

    def _write_loop(self) -> None:
        while (lines := self._queue.get()) is not None:
            size = 0
            for chunk in _chunks(lines):
                size += len(chunk)
                try:
                    while chunk:  # a raw write may be partial
                        written = self.stream.write(chunk)
                        chunk = chunk[written:] if written else b""
                except (OSError, ValueError) as exc:  # closed stdout, full disk: count, never crash
                    self.write_errors += 1
                    if self.write_errors == 1:
                        log.warning("access log write failed (further failures are counted only): %s", exc)
            try:
                self.stream.flush()
            except (OSError, ValueError):
                pass
            with self._lock:
                self._pending -= size

    def close(self, timeout: float = 2.0) -> None:
        """Write what is buffered (waiting at most ``timeout`` for the writer), then stop it."""
        self.flush()
        self._queue.put(None)
        self._writer.join(timeout)
        if self._owned:
            try:
                self.stream.close()
            except OSError:
                pass


def _chunks(lines: list[bytes]):
    """``lines`` joined into pieces of at most PIPE_BUF bytes, cut at line ends (a longer line alone)."""
    piece: list[bytes] = []
    size = 0
    for line in lines:
        if piece and size + len(line) > PIPE_BUF:
            yield b"".join(piece)
            piece, size = [], 0
        piece.append(line)
        size += len(line)
    if piece:
        yield b"".join(piece)
