"""An RFC 6902 JSONPatch between two JSON values: what the admission webhook sends back.

Only what injection produces needs to be small and exact: added keys become ``add``, removed keys
``remove``, a list that gained elements (anywhere, order kept) becomes one ``add`` per element at
its final index; any other change to a list or a scalar is one ``replace``. Applying the patch
to ``before`` gives ``after`` (tests/unit/test_inject.py checks it with its own applier).
"""

from __future__ import annotations

from typing import Any


def escape(token: str) -> str:
    """A JSON Pointer reference token (RFC 6901): ``~`` -> ``~0``, ``/`` -> ``~1``."""
    return token.replace("~", "~0").replace("/", "~1")


def json_patch(before: Any, after: Any) -> list[dict[str, Any]]:
    """The operations that turn ``before`` into ``after``."""
    ops: list[dict[str, Any]] = []
    _diff(before, after, "", ops)
    return ops


def _diff(before: Any, after: Any, path: str, ops: list[dict[str, Any]]) -> None:
    if isinstance(before, dict) and isinstance(after, dict):
        for key in before:
            if key not in after:
                ops.append({"op": "remove", "path": f"{path}/{escape(key)}"})
        for key, value in after.items():
            if key not in before:
                ops.append({"op": "add", "path": f"{path}/{escape(key)}", "value": value})
            else:
                _diff(before[key], value, f"{path}/{escape(key)}", ops)
    elif isinstance(before, list) and isinstance(after, list):
        inserted = _insertions(before, after)
        if inserted is None:
            ops.append({"op": "replace", "path": path, "value": after})
        else:
            # Ascending indexes: each add sees the list as the earlier adds left it.
            ops.extend({"op": "add", "path": f"{path}/{i}", "value": after[i]} for i in inserted)
    elif before != after or type(before) is not type(after):
        ops.append({"op": "replace", "path": path, "value": after})


def _insertions(before: list[Any], after: list[Any]) -> list[int] | None:
    """Indexes in ``after`` of the elements added to ``before``, when that is all that changed."""
    if before == after:
        return []
    inserted, j = [], 0
    for i, item in enumerate(after):
        if j < len(before) and before[j] == item:
            j += 1
        else:
            inserted.append(i)
    return inserted if j == len(before) else None
