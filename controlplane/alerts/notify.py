"""Alert notifications: Alertmanager's webhook payload, POSTed with bounded retries.

The payload is what Alertmanager's ``webhook_config`` receivers get (version "4"), one alert per
notification, so a receiver written for Alertmanager works unchanged. URLs come from the rule
(``webhooks``) and from the control plane's ``--alert-webhook`` flags. Each URL is tried up to
:data:`MAX_ATTEMPTS` times with doubling back-off (a 2xx ends it); every outcome is counted
(``meshkeeper_alert_notifications_total{result}``) and a URL that never accepted is logged once
per notification. Sending runs in the background: evaluation never waits for a receiver.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from controlplane.alerts.rule import AlertRule
from controlplane.alerts.state import AlertState
from controlplane.metrics import Metrics

log = logging.getLogger("meshkeeper.controlplane.alerts")

RECEIVER = "meshkeeper"
MAX_ATTEMPTS = 4
BACKOFF_BASE = 0.5  # seconds before the second attempt; doubled each time
BACKOFF_MAX = 5.0
POST_TIMEOUT = 5.0
ZERO_TIME = "0001-01-01T00:00:00Z"  # Alertmanager's endsAt of a firing alert

Post = Callable[[str, bytes], Awaitable[int]]  # (url, body) -> HTTP status; raises OSError


def rfc3339(ts: float | None) -> str:
    if ts is None:
        return ZERO_TIME
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def labels(namespace: str, name: str, rule: AlertRule) -> dict[str, str]:
    return {"alertname": name, "namespace": namespace, "service": rule.service, "severity": rule.severity}


def annotations(namespace: str, name: str, rule: AlertRule, value: float | None) -> dict[str, str]:
    shown = "no data" if value is None else f"{value:.4g}"
    return {"summary": rule.summary or f"{rule.service}.{namespace}: {rule.expression}",
            "description": rule.description or f"{rule.expression} (now {shown}) for {rule.service} in "
                                                f"namespace {namespace}, rule {name}"}


def fingerprint(label_set: dict[str, str]) -> str:
    text = "\xff".join(f"{k}\xff{v}" for k, v in sorted(label_set.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def payload(namespace: str, name: str, rule: AlertRule, state: AlertState, status: str,
            external_url: str) -> dict[str, Any]:
    """Alertmanager's webhook body (version 4) for one alert, ``status`` firing or resolved."""
    lab = labels(namespace, name, rule)
    ann = annotations(namespace, name, rule, state.value)
    alert = {"status": status, "labels": lab, "annotations": ann, "startsAt": rfc3339(state.fired_at),
             "endsAt": rfc3339(state.resolved_at) if status == "resolved" else ZERO_TIME,
             "generatorURL": f"{external_url}/api/alerts?namespace={quote(namespace)}&name={quote(name)}",
             "fingerprint": fingerprint(lab)}
    group = {"alertname": name}
    return {"version": "4", "groupKey": f'{{}}:{{alertname="{name}"}}', "truncatedAlerts": 0,
            "status": status, "receiver": RECEIVER, "groupLabels": group, "commonLabels": lab,
            "commonAnnotations": ann, "externalURL": external_url, "alerts": [alert]}


async def urllib_post(url: str, body: bytes) -> int:
    """POST JSON with urllib on a worker thread; the HTTP status (an HTTPError's too)."""
    def send() -> int:
        req = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "meshkeeper"})
        try:
            with urllib.request.urlopen(req, timeout=POST_TIMEOUT) as resp:  # noqa: S310 (http(s) only, checked)
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code
    return await asyncio.get_running_loop().run_in_executor(None, send)


class Notifier:
    def __init__(self, urls: Iterable[str] = (), *, metrics: Metrics | None = None, post: Post = urllib_post,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, external_url: str = "") -> None:
        self.urls = tuple(urls)
        self.metrics = metrics or Metrics()
        self.external_url = external_url.rstrip("/")
        self._post, self._sleep = post, sleep
        self._tasks: set[asyncio.Task] = set()

    def notify(self, namespace: str, name: str, rule: AlertRule, state: AlertState, status: str) -> None:
        """Send in the background to the rule's webhooks and the flag's, each once (deduplicated)."""
        body = json.dumps(payload(namespace, name, rule, state, status, self.external_url)).encode()
        for url in dict.fromkeys((*rule.webhooks, *self.urls)):
            task = asyncio.get_running_loop().create_task(self.send(url, body, f"{namespace}/{name} {status}"))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def send(self, url: str, body: bytes, what: str) -> bool:
        delay = BACKOFF_BASE
        why = ""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                status = await self._post(url, body)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # refused, reset, timed out, bad host: retried like a 5xx
                status, why = 0, f"{type(exc).__name__}: {exc}"
            else:
                why = f"HTTP {status}"
            if 200 <= status < 300:
                self.metrics.alert_notifications.labels(result="sent").inc()
                return True
            if attempt < MAX_ATTEMPTS:
                self.metrics.alert_notification_retries.inc()
                await self._sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
        self.metrics.alert_notifications.labels(result="failed").inc()
        log.warning("alert notification %s to %s failed after %d attempts (%s)", what, url, MAX_ATTEMPTS, why)
        return False

    async def close(self) -> None:
        """Wait briefly for notifications in flight (shutdown), then cancel the rest."""
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=1.0)
            for t in pending:
                t.cancel()
