"""Reading and changing the namespace's rules with the iptables tools (the only module that does).

Each address family is read with ``iptables-save`` and changed with one
``iptables-restore --noflush`` transaction (``ip6tables-*`` for IPv6): the kernel swaps the whole
table at once, so nothing ever sees half our rules, and other tools' rules are left as they are.
Whichever backend ``iptables`` points at (nf_tables on Debian bookworm, or legacy) is used.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

from sidecar.interception import ruleset


class InterceptionError(Exception):
    """A one-line reason the rules could not be read or applied (exit code 1)."""


@dataclass(frozen=True)
class Family:
    version: int
    save: str
    restore: str

    @property
    def label(self) -> str:
        return f"ipv{self.version}"


IPV4 = Family(4, "iptables-save", "iptables-restore")
IPV6 = Family(6, "ip6tables-save", "ip6tables-restore")


def available(family: Family) -> bool:
    return shutil.which(family.save) is not None and shutil.which(family.restore) is not None


def read(family: Family) -> str:
    """The family's current rules, as ``iptables-save`` prints them."""
    return _run([family.save], "")


def write(family: Family, lines: list[str]) -> None:
    """Apply ``lines`` (``iptables-restore`` input) in one transaction, keeping everything else."""
    if lines:
        _run([family.restore, *_wait_flag(family), "--noflush"], "\n".join(lines) + "\n")


def reconcile(family: Family, wanted: list[str]) -> list[str]:
    """Read the current rules and apply what turns our part of them into ``wanted``.

    Returns the transaction that was applied (``[]`` when the rules were already as wanted).
    """
    plan = ruleset.plan(wanted, read(family))
    write(family, plan)
    return plan


def _wait_flag(family: Family) -> list[str]:
    # The legacy backend takes the xtables lock and fails at once if another tool holds it; nft
    # needs no lock and its iptables-restore has no --wait.
    version = _run([family.restore, "--version"], "")
    return ["--wait"] if "legacy" in version else []


def _run(argv: list[str], stdin: str) -> str:
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise InterceptionError(f"{argv[0]} not found (install the iptables package)") from None
    except subprocess.TimeoutExpired:
        raise InterceptionError(f"{argv[0]} did not finish within 30 s") from None
    if done.returncode != 0:
        detail = " ".join((done.stderr or done.stdout).split()) or f"exit code {done.returncode}"
        hint = " (run as root, or with CAP_NET_ADMIN)" if "ermission denied" in detail else ""
        raise InterceptionError(f"{argv[0]} failed: {detail}{hint}")
    return done.stdout
