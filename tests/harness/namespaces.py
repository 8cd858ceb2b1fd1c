"""Registry namespaces that isolate tests sharing one ZooKeeper (DESIGN §3: ``<ns>``)."""

from __future__ import annotations

import itertools
import re
import secrets

from meshkeeper.registry import validate_name

_counter = itertools.count(1)


def unique_namespace(hint: str = "t") -> str:
    """A namespace name no other test of this run uses: ``<hint-slug>-<n><random>``, a DNS label."""
    slug = re.sub(r"[^a-z0-9]+", "-", hint.lower()).strip("-")[:40].strip("-") or "t"
    return validate_name("namespace", f"{slug}-{next(_counter)}{secrets.token_hex(2)}")
