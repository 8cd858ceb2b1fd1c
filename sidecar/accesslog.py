"""The access log: one JSON line per request, buffered and flushed in the background.

Like Envoy's file access log, lines are not written one by one: they collect in a buffer that is
written when it passes ``buffer_limit`` bytes or, at the latest, ``flush_interval`` seconds after
the first line went into it (Envoy flushes every second). A request thus costs the formatting of
its line and an append. On by default to stdout (``--access-log -``); ``--access-log off``
disables it and ``--access-log PATH`` appends to a file.

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
import sys
from typing import BinaryIO

log = logging.getLogger("meshkeeper.sidecar.accesslog")

FLUSH_INTERVAL = 1.0
BUFFER_LIMIT = 64 * 1024


class AccessLog:
    """Buffered line writer; call :meth:`write` from the event loop's thread only."""

    def __init__(self, stream: BinaryIO, *, flush_interval: float = FLUSH_INTERVAL,
                 buffer_limit: int = BUFFER_LIMIT) -> None:
        self.stream = stream
        self.flush_interval = flush_interval
        self.buffer_limit = buffer_limit
        self.lines = 0  # written so far (for tests and /stats)
        self.write_errors = 0
        self._buf: list[bytes] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    def open(cls, target: str) -> AccessLog | None:
        """``-``: stdout; ``off``: no access log (None); anything else: a file appended to."""
        if target == "off":
            return None
        if target == "-":
            return cls(sys.stdout.buffer)
        return cls(open(target, "ab"))  # noqa: SIM115 - owned until close()

    def write(self, line: bytes) -> None:
        self._buf.append(line)
        self._size += len(line)
        if self._size >= self.buffer_limit:
            self.flush()
        elif self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(self.flush_interval, self.flush)
            except RuntimeError:  # no loop (a unit test): write at once
                self.flush()

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._buf:
            return
        data = b"".join(self._buf)
        self.lines += len(self._buf)
        self._buf.clear()
        self._size = 0
        try:
            self.stream.write(data)
            self.stream.flush()
        except (OSError, ValueError) as exc:  # a closed or full stdout must not take requests down
            self.write_errors += 1
            if self.write_errors == 1:
                log.warning("access log write failed (further failures are counted only): %s", exc)

    def close(self) -> None:
        self.flush()
        if self.stream not in (sys.stdout.buffer, getattr(sys.__stdout__, "buffer", None)):
            try:
                self.stream.close()
            except OSError:
                pass

