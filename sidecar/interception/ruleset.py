"""Plan one ``iptables-restore --noflush`` transaction from the rules we want and the rules there are.

Pure functions over text, so the plan is tested without a kernel. What counts as ours:

- a chain whose name starts with ``MESHKEEPER_``;
- a rule in a built-in chain tagged ``-m comment --comment meshkeeper`` or jumping to one of our
  chains.

:func:`plan` turns "what there is" (``iptables-save`` output) into "what we want" (the output of
:func:`.rules.generate`, or nothing for ``--cleanup``) and touches nothing else:

- a jump we want that is already there, exactly, is kept where it is (so a second run changes
  nothing, not even the jump's position among other tools' rules);
- every other rule of ours in a built-in chain is deleted (``-D`` with the text it was saved as:
  duplicates, or jumps of a run with other flags);
- each chain of ours that we want is declared, which creates it or flushes it, then refilled
  (unless all of them already hold exactly the wanted rules);
- each chain of ours that we no longer want is flushed, then deleted (``-X``).

The transaction is empty (``[]``) when there is nothing to do, e.g. ``--cleanup`` of a clean
namespace.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sidecar.interception.rules import CHAIN_PREFIX, COMMENT

BUILTIN_CHAINS = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})


@dataclass
class Table:
    """One table of a ruleset: its chains in order, and its ``-A`` lines in order."""

    name: str
    chains: list[str] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)


def parse(lines: list[str] | str) -> dict[str, Table]:
    """Tables of ``iptables-save`` output or ``iptables-restore`` input (comments ignored)."""
    if isinstance(lines, str):
        lines = lines.splitlines()
    tables: dict[str, Table] = {}
    current: Table | None = None
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            current = tables.setdefault(line[1:], Table(line[1:]))
        elif line == "COMMIT":
            current = None
        elif current is None:
            raise ValueError(f"rule outside a table: {line!r}")
        elif line.startswith(":"):
            current.chains.append(line[1:].split()[0])
        elif line.startswith("-A "):
            current.rules.append(line)
        else:
            raise ValueError(f"unexpected line in a ruleset: {line!r}")
    return tables


def chain_of(rule: str) -> str:
    return rule.split()[1]


def is_ours(rule: str) -> bool:
    """A rule in a built-in chain that we put there (tag or jump target)."""
    words = rule.split()
    for i, word in enumerate(words[:-1]):
        if word == "--comment" and words[i + 1].strip("\"'") == COMMENT:
            return True
        if word in ("-j", "-g") and words[i + 1].startswith(CHAIN_PREFIX):
            return True
    return False


def plan(wanted: list[str], current: list[str] | str) -> list[str]:
    """The ``iptables-restore --noflush`` input that turns ``current`` into ``current`` minus our
    old rules plus ``wanted``; ``[]`` when that changes nothing."""
    want, have = parse(wanted), parse(current)
    out: list[str] = []
    for name in [*want, *(t for t in have if t not in want)]:
        out += _plan_table(want.get(name, Table(name)), have.get(name, Table(name)))
    return out


def _plan_table(want: Table, have: Table) -> list[str]:
    wanted_jumps = [r for r in want.rules if chain_of(r) in BUILTIN_CHAINS]
    ours_there = [r for r in have.rules if chain_of(r) in BUILTIN_CHAINS and is_ours(r)]
    keep, delete = set(), []
    for rule in ours_there:
        if rule in wanted_jumps and rule not in keep:
            keep.add(rule)
        else:
            delete.append("-D" + rule[2:])
    our_chains_there = [c for c in have.chains if c.startswith(CHAIN_PREFIX)]
    stale = [c for c in our_chains_there if c not in want.chains]
    chain_rules = [r for r in want.rules if chain_of(r) not in BUILTIN_CHAINS]
    in_place = set(want.chains) <= set(have.chains) and all(
        [r for r in have.rules if chain_of(r) == c] == [r for r in chain_rules if chain_of(r) == c]
        for c in want.chains
    )
    missing = [r for r in wanted_jumps if r not in keep]
    if in_place and not stale and not delete and not missing:
        return []  # already exactly as wanted (or, for cleanup, nothing of ours there)
    refill = [] if in_place else want.chains  # chains already as wanted are left alone
    return [
        f"*{want.name}",
        *delete,
        *(f":{c} - [0:0]" for c in [*refill, *stale]),  # creates or flushes
        *(f"-X {c}" for c in stale),
        *(r for r in chain_rules if refill),
        *missing,
        "COMMIT",
    ]
