"""Admin API auth (controlplane.auth): the token file, roles, and what each mode lets through."""

from __future__ import annotations

import os

import grpc
import pytest

from controlplane.auth import Authorizer, Denied, Role, TokenFile, TokenFileError, parse_tokens

TOKENS = """\
# token                     name   role
viewer-token-0123456789     vera   viewer
operator-token-0123456789   otto   operator   # on call
admin-token-0123456789      ada    admin
"""


def bearer(token: str) -> tuple:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(TOKENS)
    return path


def test_parse_tokens_reads_names_and_roles():
    tokens = parse_tokens(TOKENS)
    assert sorted(tokens.values()) == [("ada", Role.ADMIN), ("otto", Role.OPERATOR), ("vera", Role.VIEWER)]
    assert all(len(k) == 32 for k in tokens)  # SHA-256 digests, not the tokens


@pytest.mark.parametrize(("text", "message"), [
    ("only-two-fields-here x\n", "tokens:1: expected '<token> <name> <viewer|operator|admin>'"),
    ("\n# c\nsome-long-token-000000 bob root\n", "tokens:3: role 'root' is not viewer, operator or admin"),
    ("short bob viewer\n", "tokens:1: token of 'bob' is shorter than 16 characters"),
    ("same-token-0000000000 a viewer\nsame-token-0000000000 b admin\n", "tokens:2: the token of 'b' is used twice"),
])
def test_bad_token_files_name_the_line(text, message):
    with pytest.raises(TokenFileError) as info:
        parse_tokens(text)
    assert str(info.value) == message


def test_missing_token_file_is_one_clear_error(tmp_path):
    with pytest.raises(TokenFileError, match="No such file"):
        TokenFile(str(tmp_path / "absent"))


@pytest.mark.parametrize(("token", "needed", "allowed"), [
    ("viewer-token-0123456789", Role.VIEWER, True),
    ("viewer-token-0123456789", Role.OPERATOR, False),
    ("operator-token-0123456789", Role.OPERATOR, True),
    ("operator-token-0123456789", Role.ADMIN, False),
    ("admin-token-0123456789", Role.ADMIN, True),
    ("admin-token-0123456789", Role.VIEWER, True),
])
def test_roles_are_ordered(token_file, token, needed, allowed):
    auth = Authorizer(TokenFile(str(token_file)))
    if allowed:
        assert auth.check(bearer(token), needed, "ipv4:1.2.3.4:5").role >= needed
    else:
        with pytest.raises(Denied) as info:
            auth.check(bearer(token), needed)
        assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert needed.label in str(info.value)


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer nope-not-a-token-000"),),
                                      (("authorization", "Basic dXNlcjpwYXNz"),), (("authorization", "Bearer "),)])
def test_missing_or_unknown_tokens_are_unauthenticated(token_file, metadata):
    auth = Authorizer(TokenFile(str(token_file)))
    with pytest.raises(Denied) as info:
        auth.check(metadata, Role.VIEWER)
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_caller_carries_name_and_peer(token_file):
    caller = Authorizer(TokenFile(str(token_file))).check(bearer("operator-token-0123456789"), Role.VIEWER, "ipv4:10.0.0.1:1")
    assert (caller.name, caller.role, caller.peer) == ("otto", Role.OPERATOR, "ipv4:10.0.0.1:1")


def test_without_a_token_file_reads_are_open_and_writes_refused():
    auth = Authorizer(None, insecure=False)
    assert auth.check((), Role.VIEWER).name == "anonymous"
    with pytest.raises(Denied) as info:
        auth.check(bearer("anything-at-all-000000"), Role.OPERATOR)
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "--admin-tokens" in str(info.value) and "--insecure-admin" in str(info.value)


def test_insecure_admin_lets_everyone_write():
    caller = Authorizer(None, insecure=True).check((), Role.ADMIN)
    assert (caller.name, caller.role) == ("anonymous", Role.ADMIN)


def test_token_file_is_reread_when_it_changes_and_a_bad_rewrite_keeps_the_old_tokens(token_file):
    tokens = TokenFile(str(token_file))
    auth = Authorizer(tokens)
    assert auth.check(bearer("viewer-token-0123456789"), Role.VIEWER).name == "vera"
    token_file.write_text("rotated-token-0123456789 vera viewer\n")
    os.utime(token_file, ns=(1, 1))  # a distinct stamp even within one clock tick
    assert auth.check(bearer("rotated-token-0123456789"), Role.VIEWER).name == "vera"
    with pytest.raises(Denied):
        auth.check(bearer("viewer-token-0123456789"), Role.VIEWER)
    token_file.write_text("broken line\n")
    os.utime(token_file, ns=(2, 2))
    assert auth.check(bearer("rotated-token-0123456789"), Role.VIEWER).name == "vera"


def test_removing_the_token_file_revokes_every_token(token_file):
    auth = Authorizer(TokenFile(str(token_file)))
    assert auth.check(bearer("admin-token-0123456789"), Role.ADMIN).name == "ada"
    token_file.unlink()
    with pytest.raises(Denied) as info:
        auth.check(bearer("admin-token-0123456789"), Role.VIEWER)
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    token_file.write_text(TOKENS)
    assert auth.check(bearer("admin-token-0123456789"), Role.ADMIN).name == "ada"
