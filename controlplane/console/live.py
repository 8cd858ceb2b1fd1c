"""The console's live feed: ``GET /api/console/events``, Server-Sent Events.

One stream per open tab, written by :class:`meshkeeper.httpd.Stream`:

* ``event: graph`` at once and then every ``tick`` seconds (2 s): the graph document
  (:func:`controlplane.console.views.graph`), so the topology and the load numbers move without a
  reload and without each tab polling;
* ``event: mesh`` for each EventBus event (registry changes, admin writes, NACKs, alerts; pushes are
  left out: one per sidecar and type on every change), as JSON ``{"kind", "namespace", "service",
  "node_id", "who", "summary", "alert", "state", "at"}``.

A tab that falls behind the bus is dropped by the bus (controlplane.events); its stream ends and
the browser's EventSource reconnects after the ``retry`` we send. Nothing is kept per stream but
the bus subscription, closed when the client goes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from controlplane.events import EventBus, Overflow
from meshkeeper.httpd import Reply, Stream

EVENT_STREAM = "text/event-stream; charset=utf-8"
KINDS = ("registry", "nack", "admin_write", "alert", "zookeeper")
RETRY_MS = 2000


def sse(event: str, data: Any) -> bytes:
    """One SSE message; JSON has no raw newlines, so ``data`` is one line."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class LiveFeed:
    def __init__(self, events: EventBus, graph: Callable[[], dict[str, Any]], tick: float = 2.0) -> None:
        self.events, self.graph, self.tick = events, graph, tick

    def stream(self, namespace: str = "") -> Reply:
        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return 200, EVENT_STREAM, Stream(self._messages(namespace)), headers

    async def _messages(self, namespace: str) -> AsyncIterator[bytes]:
        sub = self.events.subscribe(namespace, KINDS)
        loop = asyncio.get_running_loop()
        try:
            yield f"retry: {RETRY_MS}\n\n".encode() + sse("graph", self.graph())
            next_tick = loop.time() + self.tick
            while True:
                wait = next_tick - loop.time()
                if wait <= 0:
                    yield sse("graph", self.graph())
                    next_tick = loop.time() + self.tick
                    continue
                try:
                    event = await asyncio.wait_for(sub.next(), wait)
                except TimeoutError:
                    continue
                if event is None:  # the control plane is shutting down
                    return
                yield sse("mesh", {"kind": event.kind, "namespace": event.namespace, "service": event.service,
                                   "node_id": event.node_id, "who": event.who, "summary": event.summary,
                                   "alert": event.alert, "state": event.state,
                                   "at": event.at.ToJsonString()})
        except Overflow:
            return
        finally:
            sub.close()
