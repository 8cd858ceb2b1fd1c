"""Command-line mistakes get one line on stderr and exit code 2, never a traceback."""

import pytest

from meshkeeper.cli import main


@pytest.mark.parametrize("argv, message", [
    (["sidecar", "--service", "Bad_Name", "--app-port", "8080"], "service 'Bad_Name'"),
    (["sidecar", "--service", "x", "--app-port", "99999"], "--app-port: 99999 is not a port"),
    (["sidecar", "--service", "x", "--app-port", "8080", "--zk-session-timeout", "0"], "positive number of seconds"),
    (["sidecar", "--service", "x", "--app-port", "8080", "--cp", "nohostport"], "--cp 'nohostport'"),
    (["sidecar", "--service", "x", "--app-port", "8080", "--weight", "-3"], "--weight -3"),
    (["sidecar", "--app-port", "8080"], "--service"),
    (["sidecar", "--service", "x", "--app-port", "8080", "--status-port", "70000"], "--status-port: 70000 is not a port"),
    (["sidecar", "--service", "x", "--app-port", "8080", "--status-bind", "pod-ip"], "--status-bind 'pod-ip'"),
    (["sidecar", "--service", "x", "--app-port", "8080", "--status-port", "15000"],
     "--status-port and --admin-port are both 15000"),
    (["sidecar", "--service", "x", "--app-port", "8080", "--interception", "redirect"],
     "--advertise-host 127.0.0.1: in transparent mode it must be the pod's own IP"),
    (["sidecar", "--service", "x", "--app-port", "8080", "--interception", "tproxy"], "--interception: invalid choice"),
    (["sidecar", "--service", "x", "--app-port", "8080", "--outbound-policy", "deny"], "--outbound-policy: invalid choice"),
    (["controlplane", "--vip-cidr", "240.240.0.0/33"], "--vip-cidr '240.240.0.0/33'"),
    (["controlplane", "--xds-port", "abc"], "'abc' is not a port number"),
    (["frobnicate"], "unknown command 'frobnicate'"),
])
def test_bad_arguments_get_one_line(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


# --------------------------------------------------------------------------- ZooKeeper connection strings

ENSEMBLE = "zk1:2181,zk2:2181,10.0.0.3:2182"
ZK_FLAGS = {
    "controlplane": ["controlplane"],
    "sidecar": ["sidecar", "--service", "x", "--app-port", "8080"],
    "register": ["register", "--service", "x", "--port", "8080"],
    "inject": ["inject", "-f", "-"],
}


def parse(command: str, *extra: str):
    from controlplane import main as controlplane
    from controlplane.injector import inject
    from sidecar import main as sidecar
    from sidecar import register

    modules = {"controlplane": controlplane, "sidecar": sidecar, "register": register, "inject": inject}
    return modules[command].parse_args([*ZK_FLAGS[command][1:], *extra])


@pytest.mark.parametrize("command", sorted(ZK_FLAGS))
@pytest.mark.parametrize("hosts", [ENSEMBLE, "[::1]:2181,127.0.0.1:2181", f"{ENSEMBLE}/mesh", "zk1"])
def test_zk_takes_every_server_of_an_ensemble(command, hosts):
    assert parse(command, "--zk", hosts).zk == hosts


@pytest.mark.parametrize("command", sorted(ZK_FLAGS))
@pytest.mark.parametrize("hosts, says", [
    ("zk1:2181,,zk2:2181", "bad hostname"),
    ("zk1:2181,zk2:2181,", "bad hostname"),
    ("zk1:2181,zk2:port", "'port'"),
    ("zk1:2181,zk2:70000", "out of range"),
    ("", "bad hostname"),
    (" ", "a server without a host"),
    ("zk1:2181, :2181", "a server without a host"),
])
def test_a_bad_zk_is_one_line(command, hosts, says, capsys):
    try:
        code = main([*ZK_FLAGS[command], "--zk", hosts])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert f"--zk: {hosts!r}" in err and says in err and "HOST:PORT[,HOST:PORT...]" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("command", ["controlplane", "sidecar", "register"])
def test_zk_comes_from_the_environment_and_a_bad_one_is_named(command, capsys, monkeypatch):
    monkeypatch.delenv("MESHKEEPER_ZK", raising=False)
    assert parse(command).zk == "127.0.0.1:2181"
    monkeypatch.setenv("MESHKEEPER_ZK", ENSEMBLE)
    assert parse(command).zk == ENSEMBLE
    assert parse(command, "--zk", "zk9:2181").zk == "zk9:2181"  # the flag wins
    monkeypatch.setenv("MESHKEEPER_ZK", "zk1:2181,zk2:nope")
    try:
        code = main(ZK_FLAGS[command])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and "MESHKEEPER_ZK 'zk1:2181,zk2:nope'" in err and err.count("\n") == 1, err
