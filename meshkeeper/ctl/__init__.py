"""``meshkeeper get|weight|enable|...``: the operator verbs, spoken over the admin gRPC API (DESIGN §9).

``client`` opens the channel (TLS, bearer token, deadlines) and turns gRPC errors into one line,
``render`` prints tables and documents, ``main`` parses the verbs. This module stays free of
imports so that ``meshkeeper.cli`` can route to the verbs without loading gRPC for other commands.
"""

from __future__ import annotations

# Verbs (and aliases) that meshkeeper.cli hands to meshkeeper.ctl.main.
VERBS = frozenset({
    "get", "weight", "enable", "disable", "reset", "policy", "split", "config",
    "proxy-status", "ps", "proxy-config", "pc", "events", "alert", "identity", "authz", "peer-auth",
})

# Flags every verb takes; given before the verb (`meshkeeper --cp X get services`) they route here too.
GLOBAL_FLAGS = frozenset({
    "--cp", "--token", "-n", "--namespace", "-o", "--output", "--timeout",
    "--ca", "--cert", "--key", "--tls-server-name",
})


def is_ctl_argument(arg: str) -> bool:
    """True for a verb, or for a global flag given before the verb (``--cp=X``, ``-njson`` too)."""
    if arg in VERBS:
        return True
    if arg.startswith("--"):
        return arg.split("=", 1)[0] in GLOBAL_FLAGS
    return arg[:2] in ("-n", "-o")
