"""Flag parsing shared by the ``meshkeeper`` subcommands: one-line errors, typed values.

A user mistake on the command line gets one line on stderr and exit code 2, never a usage dump
or a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

DEFAULT_ZK = "127.0.0.1:2181"


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message}\n")

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        # argparse (3.11) drops the value of ``--flag=--`` and sets the flag to [] unchecked, which
        # then breaks whatever reads it (found by fuzzing): no flag of ours takes "--" as its value.
        for arg in sys.argv[1:] if args is None else args:
            if isinstance(arg, str) and arg.startswith("-") and arg.endswith("=--"):
                self.error(f"argument {arg[:-3]}: expected a value, got '--'")
        return super().parse_known_args(args, namespace)


def port(text: str) -> int:
    """A TCP port; 0 means "pick a free one"."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"{n} is not a port number (0-65535)")
    return n


def _duration(text: str, allow_zero: bool) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (v >= 0 if allow_zero else v > 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be {'0 or more' if allow_zero else 'a positive number of'} seconds")
    return v


def seconds(text: str) -> float:
    """A positive duration in seconds (DESIGN §9: timeouts are in seconds)."""
    return _duration(text, allow_zero=False)


def non_negative_seconds(text: str) -> float:
    """A duration in seconds that may be 0."""
    return _duration(text, allow_zero=True)


def ratio(text: str) -> float:
    """A share between 0 and 1 (a sampling ratio)."""
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not 0.0 <= v <= 1.0:  # NaN included
        raise argparse.ArgumentTypeError(f"{text!r} is not a number between 0 and 1")
    return v


def host_port(text: str) -> str:
    """``HOST:PORT`` (an IPv6 host in brackets, as gRPC targets write it); the port is 1-65535."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    return text


def zk_hosts(text: str) -> str:
    """ZooKeeper's connect string, ``HOST:PORT[,HOST:PORT...][/chroot]``: one server, or every server
    of an ensemble (kazoo picks one at random and moves to another when it is lost). Checked as kazoo
    parses it, which would otherwise raise from its connection thread or retry an empty host forever."""
    from kazoo.hosts import collect_hosts

    expected = "expected HOST:PORT[,HOST:PORT...][/chroot]"
    try:
        hosts, _ = collect_hosts(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc} ({expected})") from None
    if not hosts or any(not host.strip() for host, _ in hosts):
        raise argparse.ArgumentTypeError(f"{text!r}: a server without a host ({expected})")
    return text


def add_zk_argument(p: argparse.ArgumentParser, what: str = "ZooKeeper servers") -> None:
    """``--zk HOSTS``; after parsing, :func:`zk_from_environment` fills in the default."""
    p.add_argument("--zk", type=zk_hosts, default=None, metavar="HOSTS",
                   help=f"{what}, HOST:PORT[,HOST:PORT...][/chroot]: one server or every server of an "
                        f"ensemble (env MESHKEEPER_ZK; default {DEFAULT_ZK})")


def zk_from_environment(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Without ``--zk``: ``MESHKEEPER_ZK``, else 127.0.0.1:2181; a bad value is one line naming it."""
    if args.zk is None:
        try:
            args.zk = zk_hosts(os.environ.get("MESHKEEPER_ZK") or DEFAULT_ZK)
        except argparse.ArgumentTypeError as exc:
            p.error(f"MESHKEEPER_ZK {exc}")
