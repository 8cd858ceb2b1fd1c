"""Fuzzing the command line (issue 16): every ``meshkeeper`` subcommand's argument parser, and the
operator verbs' (parser and the checks before any request), with random argument lists built from
each parser's own flags, values that are right, wrong or odd, abbreviations, ``--flag=value`` forms
and stray words.

A bad argument exits with SystemExit code 2 and one line on stderr (``prog: message``); --help
exits 0; anything else parses. Never a traceback. Nothing here runs a command: parsing only.
"""

from __future__ import annotations

import argparse
import contextlib
import io
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.support.fuzz import fuzz_settings, tally


def _ctl(argv: list[str]) -> Any:
    from meshkeeper.ctl.main import _finish, build_parser

    args = build_parser().parse_args(argv)
    return _finish(args, args.parser)


def _iptables(argv: list[str]) -> Any:
    from sidecar.interception.iptables import build_parser

    return build_parser().parse_args(argv)


def _parsers() -> dict[str, Callable[[list[str]], Any]]:
    from controlplane.injector import inject, webhook
    from controlplane.main import parse_args as controlplane
    from meshkeeper import bootstrap, demo
    from sidecar import register
    from sidecar.main import parse_args as sidecar

    return {"sidecar": sidecar, "controlplane": controlplane, "demo": demo.parse_args,
            "register": register.parse_args, "bootstrap": bootstrap.parse_args, "inject": inject.parse_args,
            "injector": webhook.parse_args, "iptables": _iptables, "ctl": _ctl}


PARSERS = _parsers()


class _Captured(Exception):
    pass


def _flags(parse: Callable[[list[str]], Any]) -> list[str]:
    """The option strings and sub-command names of the parser(s) ``parse`` builds."""
    seen: list[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.parse_args

    def capture(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        seen.append(self)
        raise _Captured

    argparse.ArgumentParser.parse_args = capture  # type: ignore[method-assign]
    try:
        with contextlib.suppress(_Captured):
            parse([])
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]
    out: set[str] = set()
    todo = list(seen)
    while todo:
        parser = todo.pop()
        for action in parser._actions:
            out.update(s for s in action.option_strings if s not in ("-h", "--help"))
            if isinstance(action, argparse._SubParsersAction):
                out.update(action.choices)
                todo.extend(action.choices.values())
    return sorted(out)


FLAGS = {name: _flags(parse) for name, parse in PARSERS.items()}
# What each needs to parse at all: half the examples start with it, so that the rest is judged too.
REQUIRED = {"sidecar": ["--service", "web", "--app-port", "8080"], "register": ["--service", "web", "--port", "8080"],
            "bootstrap": ["--proxyless"], "inject": ["-f", "-"], "injector": ["--cert", "c.pem", "--key", "k.pem"],
            "ctl": ["get", "services"]}
VALUES = ("0", "1", "-1", "65535", "65536", "99999999999999999999", "1.5", "nan", "inf", "-inf", "1e309", "", " ",
          "abc", "svc", "default", "Default", "a_b", "127.0.0.1:2181", "127.0.0.1:0", "host:", ":80", "[::1]:80",
          "a,b", ",", "h:1,h:2/chroot", "/", "/nonexistent/file", "-", "--", "=", "x=y", "v1=90", "v2=", "10s",
          "0s", "-5s", "1h", "json", "yaml", "table", "cds", "spiffe://x", "é", "\u202e", "a" * 300)


@st.composite
def argv(draw: st.DrawFn, name: str) -> list[str]:
    flags = FLAGS[name]
    token = st.one_of(
        st.sampled_from(flags),
        st.sampled_from(flags),
        st.sampled_from(VALUES),
        st.sampled_from(VALUES),
        st.tuples(st.sampled_from(flags), st.sampled_from(VALUES)).map(lambda fv: f"{fv[0]}={fv[1]}"),
        st.sampled_from(flags).map(lambda f: f[: max(3, len(f) // 2)]),  # an abbreviation, maybe ambiguous
        st.text(max_size=10).filter(lambda s: "\x00" not in s),
    )
    base = REQUIRED.get(name, []) if draw(st.booleans()) else []
    return base + draw(st.lists(token, max_size=10))


def check_parse(name: str, args: list[str]) -> None:
    err = io.StringIO()
    out = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            PARSERS[name](args)
        except SystemExit as exc:
            code = exc.code
        else:
            tally("parsed")
            return
    text = err.getvalue()
    if code == 0:
        tally("help")
        return
    tally("refused")
    assert code == 2, f"{name} {args!r}: exit code {code!r}, stderr {text!r}"
    own = sum(a.count("\n") for a in args)  # line breaks of the arguments themselves, quoted back
    assert text.endswith("\n") and text.count("\n") <= 1 + own and text.strip(), (
        f"{name} {args!r}: not one line on stderr: {text!r}")
    assert "Traceback" not in text


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_parser_knows_flags(name: str) -> None:
    assert FLAGS[name], f"no flags found for {name}"


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_any_arguments_parse_or_exit_2_with_one_line(name: str) -> None:
    @fuzz_settings(100)
    @given(args=argv(name))
    @example(args=["--nonexistent-flag"])
    @example(args=["-"])
    @example(args=REQUIRED.get(name, []))
    # Found by fuzzing: argparse set a flag given as --flag=-- to [] unchecked (a TypeError after).
    @example(args=[*REQUIRED.get(name, []), f"{FLAGS[name][-1]}=--"])
    def run(args: list[str]) -> None:
        check_parse(name, args)

    run()


def test_a_flag_given_as_equals_dash_dash_is_refused_in_one_line() -> None:
    # Found by fuzzing: argparse set --http-port=-- to [] without its type check, and the control
    # plane's own checks then raised TypeError (a traceback).
    check_parse("controlplane", ["--http-port=--"])
    with pytest.raises(SystemExit) as exc, contextlib.redirect_stderr(io.StringIO()) as err:
        PARSERS["controlplane"](["--http-port=--"])
    assert exc.value.code == 2 and err.getvalue() == "meshkeeper controlplane: argument --http-port: expected a value, got '--'\n"
