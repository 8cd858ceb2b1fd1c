"""Which CA the control plane's flags ask for (docs/identity.md), first match:

1. ``--ca-cert FILE --ca-key FILE [--ca-bundle FILE]``: a real PKI; nothing is written anywhere
   (a passphrase, if given, decrypts an encrypted ``--ca-key``).
2. A passphrase (``--ca-passphrase-file FILE`` or ``MESHKEEPER_CA_PASSPHRASE``): the CA shared by
   the replicas in ZooKeeper (controlplane.ca.shared). The control plane waits for ZooKeeper before
   it serves: it cannot sign without its CA.
3. Neither: no CA; one warning.

Files are read and checked while the flags are parsed (a bad one is a one-line usage error); the
ZooKeeper CA is read once ZooKeeper answers.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable

from kazoo.client import KazooClient
from kazoo.exceptions import KazooException
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.retry import KazooRetry

from controlplane.ca.authority import Authority, CAError, Clock, from_files
from controlplane.ca.issuer import DEFAULT_CERT_TTL, Issuer
from controlplane.ca.shared import CA_ZNODE, load_or_create, read
from controlplane.ca.tokens import TokenKey, derive_key
from meshkeeper.cliargs import seconds
from meshkeeper.identity import DEFAULT_TRUST_DOMAIN, IdentityError, validate_trust_domain

log = logging.getLogger("meshkeeper.controlplane.ca")

PASSPHRASE_ENV = "MESHKEEPER_CA_PASSPHRASE"
MIN_CERT_TTL = 1.0
CONNECT_WAIT = 5.0  # seconds per attempt to reach ZooKeeper for the shared CA


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("identity (docs/identity.md)")
    g.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN, metavar="TD",
                   help="SPIFFE trust domain of workload identities (default %(default)s)")
    g.add_argument("--cert-ttl", type=seconds, default=DEFAULT_CERT_TTL, metavar="SECONDS",
                   help="lifetime of workload certificates, seconds (default %(default)g)")
    g.add_argument("--ca-cert", metavar="FILE", help="the CA certificate that signs workload certificates "
                   "(then its intermediates, if any), PEM")
    g.add_argument("--ca-key", metavar="FILE", help="the private key of --ca-cert, PEM")
    g.add_argument("--ca-bundle", metavar="FILE",
                   help="the roots sidecars trust, PEM (needed when --ca-cert is an intermediate)")
    g.add_argument("--ca-passphrase-file", metavar="FILE",
                   help="without --ca-cert: the replicas share one self-signed CA in ZooKeeper "
                        f"{CA_ZNODE}, its key encrypted with this passphrase (or env {PASSPHRASE_ENV})")


def check_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Validate the identity flags (``p.error`` on a bad one); sets ``args.ca_passphrase`` (bytes or
    None) and ``args.ca_authority`` (the Authority of ``--ca-cert``/``--ca-key``, or None)."""
    try:
        validate_trust_domain(args.trust_domain)
    except IdentityError as exc:
        p.error(f"--trust-domain: {exc}")
    if args.cert_ttl < MIN_CERT_TTL:
        p.error(f"--cert-ttl must be at least {MIN_CERT_TTL:g} second")
    if bool(args.ca_cert) != bool(args.ca_key):
        p.error("--ca-cert and --ca-key go together")
    if args.ca_bundle and not args.ca_cert:
        p.error("--ca-bundle needs --ca-cert and --ca-key")
    args.ca_passphrase = _passphrase(p, args)
    args.ca_authority = None
    if args.ca_cert:
        try:
            args.ca_authority = from_files(args.ca_cert, args.ca_key, args.ca_bundle, args.ca_passphrase)
        except CAError as exc:
            p.error(str(exc))


def _passphrase(p: argparse.ArgumentParser, args: argparse.Namespace) -> bytes | None:
    if args.ca_passphrase_file:
        try:
            with open(args.ca_passphrase_file, "rb") as f:
                passphrase = f.read().rstrip(b"\r\n")
        except OSError as exc:
            p.error(f"--ca-passphrase-file {args.ca_passphrase_file}: {exc.strerror}")
        if not passphrase:
            p.error(f"--ca-passphrase-file {args.ca_passphrase_file}: the file is empty")
        return passphrase
    env = os.environ.get(PASSPHRASE_ENV)
    return env.encode() if env else None


# --------------------------------------------------------------------------- the injector's tokens


def add_token_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of processes that only mint bootstrap tokens (the injector): the CA's key, from files
    or from ZooKeeper (read, never created), to derive the token key from."""
    g = p.add_argument_group("identity tokens (docs/identity.md; the control plane's CA)")
    g.add_argument("--ca-cert", metavar="FILE", help="the control plane's --ca-cert")
    g.add_argument("--ca-key", metavar="FILE", help="the control plane's --ca-key")
    g.add_argument("--ca-passphrase-file", metavar="FILE",
                   help=f"read the CA the control planes share in ZooKeeper {CA_ZNODE} (--zk) with this "
                        f"passphrase (or env {PASSPHRASE_ENV})")


def token_minter(p: argparse.ArgumentParser, args: argparse.Namespace,
                 connect_timeout: float = 10.0) -> Callable[[str, str], str] | None:
    """``mint(namespace, service) -> token`` from the CA the flags name, or None without one.
    A CA that cannot be read is ``p.error`` (one line)."""
    if bool(args.ca_cert) != bool(args.ca_key):
        p.error("--ca-cert and --ca-key go together")
    passphrase = _passphrase(p, args)
    try:
        if args.ca_cert:
            authority = from_files(args.ca_cert, args.ca_key, None, passphrase, require_roots=False)
        elif passphrase is not None:
            authority = _read_shared(args.zk, passphrase, connect_timeout)
        else:
            return None
    except CAError as exc:
        p.error(str(exc))
    return TokenKey(derive_key(authority.key_der())).mint


def _read_shared(hosts: str, passphrase: bytes, connect_timeout: float) -> Authority:
    client = KazooClient(hosts=hosts, timeout=10.0)
    try:
        try:
            client.start(timeout=connect_timeout)
        except KazooTimeoutError:
            raise CAError(f"cannot reach ZooKeeper {hosts} to read the CA in {CA_ZNODE}") from None
        try:
            authority = read(client, passphrase)
        except KazooException as exc:
            raise CAError(f"reading {CA_ZNODE} from ZooKeeper {hosts}: {type(exc).__name__}") from None
    finally:
        client.stop()
        client.close()
    if authority is None:
        raise CAError(f"no CA in ZooKeeper {hosts} {CA_ZNODE} yet: start a control plane with the passphrase first")
    return authority


# --------------------------------------------------------------------------- the control plane


def _shared(hosts: str, session_timeout: float, passphrase: bytes, trust_domain: str, clock: Clock,
            give_up: threading.Event) -> tuple[Authority, bool] | None:
    """Blocking (an executor thread): connect a client of its own, read or create the CA, close."""
    client = KazooClient(hosts=hosts, timeout=session_timeout,
                         connection_retry=KazooRetry(max_tries=-1, delay=0.1, backoff=2, max_delay=2.0))
    waited = False
    try:
        while not give_up.is_set():
            try:
                client.start(timeout=CONNECT_WAIT)
            except KazooTimeoutError:
                if not waited:
                    log.warning("waiting for ZooKeeper %s to read the shared CA (%s)", hosts, CA_ZNODE)
                    waited = True
                continue
            retry = KazooRetry(max_tries=10, delay=0.1, backoff=2, max_delay=2.0)
            try:
                return retry(load_or_create, client, passphrase, trust_domain, clock)
            except KazooException as exc:
                log.warning("reading the shared CA %s: %s; trying again", CA_ZNODE, type(exc).__name__)
                client.stop()
        return None
    finally:
        client.stop()
        client.close()


async def build_issuer(args: argparse.Namespace, stop: asyncio.Event, clock: Clock = time.time) -> Issuer | None:
    """The Issuer the flags ask for, or None (no CA, or ``stop`` was set while waiting for
    ZooKeeper: then ``args.ca_stopped`` is True). CAError: the shared CA cannot be used (a wrong
    passphrase); the message is one line."""
    args.ca_stopped = False
    td, ttl = args.trust_domain, args.cert_ttl
    if args.ca_authority is not None:
        return Issuer(args.ca_authority, td, ttl, clock,
                      origin=f"--ca-cert {args.ca_cert} ({args.ca_authority.subject})")
    if args.ca_passphrase is None:
        log.warning("no CA (--ca-cert/--ca-key, or a CA passphrase: --ca-passphrase-file or %s): "
                    "no workload certificates, the mesh stays plaintext", PASSPHRASE_ENV)
        return None
    give_up = threading.Event()
    loop = asyncio.get_running_loop()
    fetch = loop.run_in_executor(None, _shared, args.zk, args.zk_session_timeout, args.ca_passphrase,
                                 td, clock, give_up)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([fetch, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if not fetch.done():
        give_up.set()
        args.ca_stopped = True
        await fetch
        return None
    found = fetch.result()
    if found is None:
        args.ca_stopped = True
        return None
    authority, created = found
    where = "created in" if created else "shared through"
    return Issuer(authority, td, ttl, clock,
                  origin=f"a self-signed CA {where} ZooKeeper {CA_ZNODE} ({authority.subject})")
