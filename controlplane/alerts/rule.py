"""An alert rule, ``/meshkeeper/<ns>/alerts/<name>`` (JSON; docs/alerts.md).

Validated once, here, like a traffic policy: unknown fields are refused, not ignored, and every
error names its field (``alert.threshold: ...``). The watch reads rules as a side table of the
registry snapshot, so a bad rule znode is skipped with a log line and a metric and the last good
rule stays; the admin API refuses a bad rule before writing it.

Conditions (``condition`` and ``threshold``), evaluated over the last LRS interval summed over
every replica's reporters (controlplane.alerts.evaluate):

* ``error_ratio``        errored / finished requests to the service     > threshold (0..1)
* ``p99_latency_ms``     99th percentile of request latency, ms         > threshold
* ``serving_instances``  instances registered, enabled, weight > 0      < threshold
* ``nacks``              proxies of the service holding an unresolved NACK > threshold
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from meshkeeper.registry import RecordError, validate_name

CONDITIONS = {  # name -> (comparison, lowest threshold, highest threshold, integer)
    "error_ratio": (">", 0.0, 1.0, False),
    "p99_latency_ms": (">", 0.0, 3_600_000.0, False),
    "serving_instances": ("<", 1, 100_000, True),
    "nacks": (">", 0, 100_000, True),
}
SEVERITIES = ("critical", "warning", "info")
MAX_FOR_SECONDS = 24 * 3600
MAX_TEXT = 1024
MAX_WEBHOOKS = 10
_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_URL_RE = re.compile(r"^https?://[^\s/?#]+[^\s]*$")
FIELDS = ("service", "condition", "threshold", "for", "severity", "min_rps", "summary", "description", "webhooks")


class AlertRuleError(RecordError):
    """A rule that does not validate; the message names the field."""


@dataclass(frozen=True, slots=True)
class AlertRule:
    service: str
    condition: str
    threshold: float
    for_seconds: float = 0.0
    severity: str = "warning"
    min_rps: float = 0.0  # error_ratio and p99_latency_ms: below this request rate nothing fires
    summary: str = ""
    description: str = ""
    webhooks: tuple[str, ...] = ()

    @property
    def expression(self) -> str:
        """``error_ratio > 0.05``: what fires, for people."""
        op = CONDITIONS[self.condition][0]
        return f"{self.condition} {op} {_num(self.threshold)}"

    def breached(self, value: float | None) -> bool:
        if value is None:
            return False
        return value < self.threshold if CONDITIONS[self.condition][0] == "<" else value > self.threshold

    @classmethod
    def decode(cls, data: bytes | str | dict | None) -> AlertRule:
        obj = _load(data)
        unknown = sorted(set(obj) - set(FIELDS))
        if unknown:
            raise AlertRuleError(f"alert.{unknown[0]}: unknown field (known: {', '.join(FIELDS)})")
        for req in ("service", "condition", "threshold"):
            if req not in obj:
                raise AlertRuleError(f"alert.{req}: required")
        try:
            service = validate_name("service", obj["service"])
        except RecordError as exc:
            raise AlertRuleError(f"alert.service: {exc}") from None
        condition = obj["condition"]
        if not isinstance(condition, str) or condition not in CONDITIONS:
            raise AlertRuleError(f"alert.condition: {condition!r} is not one of {', '.join(CONDITIONS)}")
        _, lo, hi, integer = CONDITIONS[condition]
        threshold = _number("threshold", obj["threshold"], lo, hi, integer=integer)
        severity = obj.get("severity", "warning")
        if severity not in SEVERITIES:
            raise AlertRuleError(f"alert.severity: {severity!r} is not one of {', '.join(SEVERITIES)}")
        webhooks = obj.get("webhooks", [])
        if not isinstance(webhooks, list) or len(webhooks) > MAX_WEBHOOKS:
            raise AlertRuleError(f"alert.webhooks: expected a list of at most {MAX_WEBHOOKS} URLs")
        for i, url in enumerate(webhooks):
            if not isinstance(url, str) or not _URL_RE.match(url):
                raise AlertRuleError(f"alert.webhooks[{i}]: {url!r} is not an http:// or https:// URL")
        return cls(service=service, condition=condition, threshold=threshold,
                   for_seconds=parse_duration(obj.get("for", "0s"), "alert.for"),
                   severity=severity, min_rps=_number("min_rps", obj.get("min_rps", 0), 0, 1e9),
                   summary=_text("summary", obj.get("summary", "")),
                   description=_text("description", obj.get("description", "")), webhooks=tuple(webhooks))

    def to_json(self) -> dict[str, Any]:
        """The rule as stored: defaults left out, ``for`` as a duration string."""
        out: dict[str, Any] = {"service": self.service, "condition": self.condition,
                               "threshold": int(self.threshold) if CONDITIONS[self.condition][3] else self.threshold}
        if self.for_seconds:
            out["for"] = format_duration(self.for_seconds)
        if self.severity != "warning":
            out["severity"] = self.severity
        if self.min_rps:
            out["min_rps"] = self.min_rps
        for name in ("summary", "description"):
            if getattr(self, name):
                out[name] = getattr(self, name)
        if self.webhooks:
            out["webhooks"] = list(self.webhooks)
        return out

    def encode(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True).encode()


def parse_duration(value: Any, where: str) -> float:
    """A Prometheus-style duration (``30s``, ``5m``, ``1h``, ``500ms``) or a number of seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value) if -1e300 < value < 1e300 else float("inf")  # (float() of a huge int overflows)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value.strip())):
        seconds = float(m.group(1)) * _UNIT[m.group(2)]
    else:
        raise AlertRuleError(f"{where}: {value!r} is not a duration (like 30s, 5m, 1h)")
    if not 0 <= seconds <= MAX_FOR_SECONDS:
        raise AlertRuleError(f"{where}: {value!r} is outside 0s..24h")
    return seconds


def format_duration(seconds: float) -> str:
    if seconds and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


def _load(data: bytes | str | dict | None) -> dict[str, Any]:
    if isinstance(data, dict):
        return data
    if data is None or data in (b"", ""):
        raise AlertRuleError("alert: empty; a rule needs service, condition and threshold")
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # (nested past the parser's depth)
        raise AlertRuleError(f"alert: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise AlertRuleError(f"alert: expected an object, got {type(obj).__name__}")
    return obj


def _number(name: str, value: Any, lo: float, hi: float, *, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
        raise AlertRuleError(f"alert.{name}: expected a number, got {value!r}")
    if integer and value != int(value):
        raise AlertRuleError(f"alert.{name}: expected a whole number, got {value!r}")
    if not lo <= value <= hi:
        raise AlertRuleError(f"alert.{name}: {_num(value)} is outside {_num(lo)}..{_num(hi)}")
    return int(value) if integer else float(value)


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise AlertRuleError(f"alert.{name}: expected a string of at most {MAX_TEXT} characters")
    return value


def _num(v: float) -> str:
    try:
        return f"{v:g}"
    except OverflowError:  # an integer too large for a float
        return str(v)
