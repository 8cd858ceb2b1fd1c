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
