"""Reading what meshkeeper processes expose: Prometheus text, structured log lines, config dumps.

    metric_value(text, "meshkeeper_upstream_rq_pending_overflow", cluster="outbound|catalog.ns")
    log_events(sidecar.stderr_text(), "eject")          # [{"event": "eject", ...}, ...]
    list(find_key(config_dump, "outlier_detection"))    # every value under that key, at any depth
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``; 0 when there are none.

    A counter family ``x`` is exposed as ``x_total`` by prometheus-client; either spelling matches.
    """
    names = {name, f"{name}_total"}
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in names and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def log_events(text: str, event: str) -> list[dict[str, Any]]:
    """The JSON objects ``{"event": <event>, ...}`` found in log lines, in order.

    The object may follow a logging prefix on the same line (``... WARNING name: {...}``).
    """
    out = []
    for line in text.splitlines():
        start = line.find("{")
        if start < 0 or f'"{event}"' not in line:
            continue
        try:
            obj = json.loads(line[start:line.rfind("}") + 1])
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("event") == event:
            out.append(obj)
    return out


def find_key(obj: Any, key: str) -> Iterator[Any]:
    """Every value stored under ``key`` in nested dicts and lists (a config dump, a JSON page)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key:
                yield v
            yield from find_key(v, key)
    elif isinstance(obj, list):
        for v in obj:
            yield from find_key(v, key)
