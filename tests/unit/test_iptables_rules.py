"""``meshkeeper iptables``: the rules for each flag combination (golden files), the plans that
update or remove them, and flag validation through the real command line.

Golden files live in tests/golden/iptables/ and are compared exactly; after an intended change,
rewrite them with ``MESHKEEPER_REFRESH_GOLDEN=1 .venv/bin/pytest tests/unit/test_iptables_rules.py``
and review the diff like code.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.interception import ruleset
from sidecar.interception.iptables import build_parser, config_from, render
from sidecar.interception.rules import CaptureConfig, generate

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "iptables"
REFRESH = os.environ.get("MESHKEEPER_REFRESH_GOLDEN") == "1"

CASES = {
    "defaults": [],
    "custom-ports": ["--proxy-uid", "2000", "--admin-port", "16000", "--status-port", "16021",
                     "--outbound-port", "16001", "--inbound-port", "16006", "--dns-port", "16053"],
    "inbound-ports": ["--inbound-ports", "8080,9090"],
    "inbound-none": ["--inbound-ports", ""],
    "exclude": ["--exclude-inbound-ports", "22,8443", "--exclude-outbound-ports", "3306,6379",
                "--exclude-cidrs", "10.96.0.0/12,169.254.169.254"],
    "include-cidrs": ["--include-cidrs", "10.0.0.0/8,172.16.0.0/12", "--exclude-cidrs", "10.96.0.0/12"],
    "dual-stack-cidrs": ["--include-cidrs", "10.0.0.0/8,fd00::/8", "--exclude-cidrs", "fd00:1::/32"],
    "no-dns": ["--no-dns"],
    "proxy-gid": ["--proxy-gid", "1337"],
}


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if REFRESH:
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with MESHKEEPER_REFRESH_GOLDEN=1 to create it"
    assert text == path.read_text(), f"{name} differs from its golden file (refresh if intended)"


def config_of(argv: list[str]) -> CaptureConfig:
    parser = build_parser()
    return config_from(parser.parse_args(argv), parser)


@pytest.mark.parametrize("case", CASES)
def test_rules_match_golden_file(case: str) -> None:
    check_golden(f"{case}.rules", render(config_of(CASES[case])))


def test_installed_state_is_recognised_and_duplicate_jumps_removed() -> None:
    # A namespace with other tools' rules, our defaults, and a second copy of our OUTPUT jump.
    saved = (GOLDEN / "installed-twice.save").read_text()
    plan = ruleset.plan(generate(CaptureConfig()), saved)
    check_golden("reapply-defaults.plan", "\n".join(plan) + "\n")
    assert plan == ["*nat", "-D OUTPUT -m comment --comment meshkeeper -j MESHKEEPER_OUTPUT",
                    "COMMIT"]


def test_switching_flags_replaces_our_rules_only() -> None:
    saved = (GOLDEN / "installed-twice.save").read_text()
    plan = ruleset.plan(generate(CaptureConfig(dns=False)), saved)
    check_golden("reapply-no-dns.plan", "\n".join(plan) + "\n")
    assert not [line for line in plan if "DNAT" in line or "NOTRACK" in line or "8000" in line]


def test_cleanup_removes_exactly_ours() -> None:
    saved = (GOLDEN / "installed-twice.save").read_text()
    plan = ruleset.plan([], saved)
    check_golden("cleanup.plan", "\n".join(plan) + "\n")
    assert {line.split()[0] for line in plan} == {"*raw", "*nat", "-D", ":MESHKEEPER_DNS_CT_INBOUND",
                                                 ":MESHKEEPER_DNS_CT_OUTPUT", ":MESHKEEPER_DNS",
                                                 ":MESHKEEPER_INBOUND", ":MESHKEEPER_IN_REDIRECT",
                                                 ":MESHKEEPER_OUTPUT", ":MESHKEEPER_REDIRECT", "-X",
                                                 "COMMIT"}
    assert all("meshkeeper" in line for line in plan if line.startswith("-D"))


def test_nothing_to_do_is_an_empty_transaction() -> None:
    assert ruleset.plan([], "*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -j RETURN\nCOMMIT\n") == []
    installed = ruleset.parse(generate(CaptureConfig()))
    as_saved = []
    for table in installed.values():  # iptables-save groups rules by chain
        as_saved += [f"*{table.name}", *(f":{c} - [0:0]" for c in table.chains)]
        as_saved += sorted(table.rules, key=lambda r: ruleset.chain_of(r) not in ruleset.BUILTIN_CHAINS)
        as_saved.append("COMMIT")
    assert ruleset.plan(generate(CaptureConfig()), as_saved) == []


def meshkeeper(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": "/nonexistent"}  # no iptables binary reachable, whatever happens
    return subprocess.run([sys.executable, "-m", "meshkeeper.cli", "iptables", *args],
                          capture_output=True, text=True, env=env, timeout=30)


@pytest.mark.parametrize("args, says", [
    (["--proxy-uid", "istio-proxy"], "'istio-proxy' is not a numeric uid"),
    (["--proxy-gid", "-1"], "'-1' is not a numeric gid"),
    (["--exclude-cidrs", "10.0.0.0/33"], "'10.0.0.0/33' is not a CIDR"),
    (["--include-cidrs", "*,10.0.0.0/8"], "'*' cannot be mixed with CIDRs"),
    (["--exclude-cidrs", "*"], "'*' is not allowed here"),
    (["--inbound-ports", "8080,70000"], "'70000' is not a port number"),
    (["--inbound-ports", "*,8080"], "'*' cannot be mixed with ports"),
    (["--inbound-ports", "15006"], "15006 is the sidecar's own port (--inbound-port)"),
    (["--outbound-port", "15006"], "--outbound-port and --inbound-port are both 15006"),
    (["--inbound-ports", "8080,15021"], "15021 is the sidecar's own port (--status-port)"),
    (["--status-port", "15000"], "--admin-port and --status-port are both 15000"),
    (["--dns-port", "0"], "'0' is not a port number"),
])
def test_bad_flags_are_one_line_exit_2_and_touch_nothing(args: list[str], says: str) -> None:
    done = meshkeeper(*args)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and says in done.stderr
    assert done.stderr.startswith("meshkeeper iptables: ")


def test_dry_run_prints_the_rules_and_needs_no_iptables() -> None:
    done = meshkeeper("--dry-run")
    assert done.returncode == 0, done.stderr
    assert done.stdout == (GOLDEN / "defaults.rules").read_text()


def test_missing_iptables_is_one_line_exit_1() -> None:
    for args in ([], ["--cleanup"]):
        done = meshkeeper(*args)
        assert done.returncode == 1
        assert done.stderr == ("meshkeeper iptables: iptables-save/iptables-restore not found "
                               "(install the iptables package)\n")
