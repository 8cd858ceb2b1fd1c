"""The admin API under fuzzing (issue 16; tests/unit/test_fuzz_admin.py, bench/fuzz.py): a real
:class:`controlplane.admin.AdminService` on a real gRPC server over a real ZooKeeper, one namespace
seeded with services (http, tcp, one whose policy and config znodes are invalid), instances,
overrides, a policy, an authz policy, peer authentication, a config and an alert rule; request
strategies for every unary RPC; and the check of one call:

- it ends with OK, INVALID_ARGUMENT, NOT_FOUND, ABORTED, FAILED_PRECONDITION, PERMISSION_DENIED or
  UNAUTHENTICATED (never UNKNOWN or INTERNAL: an exception escaped), its message one line;
- a refused call leaves the namespace's znodes (and the alert states, and the set of namespaces)
  exactly as they were; after an accepted one, every znode it created or changed decodes with the
  registry's own decoder for its path (what the control plane's watch reads).

Requests never name the default namespace (an empty ``namespace`` means ``default``, shared with
every other test of the session's ZooKeeper): a namespace is the seeded one or a name the
registry refuses.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from hypothesis import strategies as st

from controlplane.admin import AdminService
from controlplane.admin import add_to_server as add_admin_to_server
from controlplane.alerts.rule import AlertRule
from controlplane.alerts.state import STATE_ROOT
from controlplane.auth import Authorizer, TokenFile
from controlplane.events import EventBus
from controlplane.proxies import ProxyRegistry
from controlplane.zkstore import ZkStore
from meshkeeper.admin.v1 import admin_pb2 as pb
from meshkeeper.admin.v1 import admin_pb2_grpc
from meshkeeper.policy import decode_policy
from meshkeeper.registry import (
    ROOT,
    InstanceRecord,
    Override,
    Paths,
    RecordError,
    RuntimeValues,
    ServiceRecord,
    validate_name,
)
from meshkeeper.security import AuthzPolicy, PeerAuthentication

TOKENS = {"admin": "fuzz-admin-token-0123456789", "operator": "fuzz-operator-token-0123456789",
          "viewer": "fuzz-viewer-token-0123456789"}
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ABORTED,
           grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}
INSTANCES = ("10.0.0.1:8080", "10.0.0.2:8080")
GHOST = "10.0.0.9:8080"  # an override without an instance
POLICY = {"retry": {"attempts": 2}, "split": {"v1": 50, "v2": 50}, "timeout_ms": 1000}
AUTHZ = {"action": "ALLOW", "rules": [{"from": ["spiffe://meshkeeper.local/ns/shop/sa/frontend", "ns:ops"],
                                       "methods": ["GET"], "paths": ["/api/"]}]}
ALERT = {"service": "catalog", "condition": "error_ratio", "threshold": 0.05, "for": "30s"}
MAX_ZNODES = 150  # past this many in the namespace (accepted writes add some), it is seeded anew


def _decoder(ns: str, path: str) -> Callable[[bytes], Any] | None:
    """The registry's decoder of the znode at ``path``; None: a container, or nothing the admin API writes."""
    paths = Paths(ns)
    if path.startswith(f"{STATE_ROOT}/"):
        return None  # alert state: written by the alert evaluator, only deleted here
    rest = path[len(paths.base) + 1:].split("/")
    if rest == ["peer_authentication"]:
        return PeerAuthentication.decode
    if rest[0] == "config" and len(rest) == 2:
        return RuntimeValues.decode
    if rest[0] == "alerts" and len(rest) == 2:
        return AlertRule.decode
    if rest[0] == "services" and len(rest) >= 3:
        leaf = rest[2]
        if len(rest) == 3:
            return {"policy": decode_policy, "authz": AuthzPolicy.decode,
                    "peer_authentication": PeerAuthentication.decode}.get(leaf)
        if leaf == "overrides" and len(rest) == 4:
            return Override.decode
        if leaf == "instances" and len(rest) == 4:
            return InstanceRecord.decode
    return None


class AdminHarness:
    """An AdminService on 127.0.0.1:<port 0> over ZooKeeper ``hosts``, its loop on a thread of its own."""

    def __init__(self, hosts: str, namespace: str, workdir: Path) -> None:
        from kazoo.client import KazooClient

        self.ns = namespace
        self.kz = KazooClient(hosts=hosts, timeout=10.0)
        self.kz.start(timeout=15)
        workdir.mkdir(parents=True, exist_ok=True)
        tokens = workdir / "admin-fuzz-tokens"
        tokens.write_text("".join(f"{TOKENS[r]} fuzz-{r} {r}\n" for r in TOKENS))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.admin = AdminService(ZkStore(self.kz), Authorizer(TokenFile(str(tokens))), proxies=ProxyRegistry(),
                                  events=EventBus())

        async def start() -> tuple[grpc.aio.Server, int]:
            server = grpc.aio.server()
            add_admin_to_server(server, self.admin)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            return server, port

        self.server, port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(15)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = admin_pb2_grpc.AdminServiceStub(self.channel)
        self.seed()

    # --- the namespace ---------------------------------------------------------------------

    def seed(self) -> None:
        """The namespace as every example may find it (deleted and written anew)."""
        paths = Paths(self.ns)
        for root in (paths.base, f"{STATE_ROOT}/{self.ns}"):
            if self.kz.exists(root):
                self.kz.delete(root, recursive=True)
        create = self.kz.create
        create(paths.service("catalog"), ServiceRecord("http").encode(), makepath=True)
        for i, key in enumerate(INSTANCES):
            host, port = key.split(":")
            inst = InstanceRecord(address=host, port=int(port), labels={"version": f"v{i + 1}"})
            create(paths.instance("catalog", inst.key), inst.encode(), makepath=True)
        create(paths.override("catalog", INSTANCES[0]), Override(weight=5).encode(), makepath=True)
        create(paths.override("catalog", GHOST), Override(enabled=False).encode(), makepath=True)
        create(paths.policy("catalog"), json.dumps(POLICY).encode())
        create(paths.authz("catalog"), json.dumps(AUTHZ).encode())
        create(paths.peer_authentication("catalog"), b'{"mode": "STRICT"}')
        create(paths.peer_authentication(), b'{"mode": "PERMISSIVE"}')
        create(paths.config("catalog"), RuntimeValues({"color": "blue", "feature.x": "true"}).encode(), makepath=True)
        create(paths.alert("high-errors"), json.dumps(ALERT).encode(), makepath=True)
        create(paths.service("db"), ServiceRecord("tcp").encode())
        create(paths.service("legacy"), b"{not json")  # invalid znodes: the Precondition paths
        create(paths.policy("legacy"), b'{"retry": {"attempts": "many"}}')
        create(paths.config("legacy"), b"[1, 2]")
        create(paths.authz("legacy"), b'{"action": "MAYBE"}')

    def tree(self) -> dict[str, tuple[bytes, int]]:
        """Every znode of the namespace and of its alert states: path -> (data, version); read a
        level at a time, the level's reads in flight together."""
        from kazoo.exceptions import NoNodeError

        out: dict[str, tuple[bytes, int]] = {}
        level = [Paths(self.ns).base, f"{STATE_ROOT}/{self.ns}"]
        while level:
            pending = [(path, self.kz.get_async(path), self.kz.get_children_async(path)) for path in level]
            level = []
            for path, got, children in pending:
                try:
                    data, stat = got.get(timeout=10)
                    names = children.get(timeout=10)
                except NoNodeError:
                    continue
                out[path] = (data, stat.version)
                level.extend(f"{path}/{c}" for c in names)
        return out

    def namespaces(self) -> set[str]:
        return set(self.kz.get_children(ROOT)) if self.kz.exists(ROOT) else set()

    # --- one call --------------------------------------------------------------------------

    def call(self, rpc: str, request: Any, role: str | None) -> tuple[grpc.StatusCode, str]:
        metadata = () if role is None else (("authorization", f"Bearer {TOKENS.get(role, role)}"),)
        try:
            if rpc == "WatchEvents":  # a stream: refused at once, or open until the deadline
                for _ in self.stub.WatchEvents(request, metadata=metadata, timeout=0.05):
                    pass
            else:
                getattr(self.stub, rpc)(request, metadata=metadata, timeout=30)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
            if rpc == "WatchEvents" and code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return grpc.StatusCode.OK, ""
            return code, details
        return grpc.StatusCode.OK, ""

    def check(self, rpc: str, request: Any, role: str | None) -> grpc.StatusCode:
        before, spaces = self.tree(), self.namespaces()
        code, details = self.call(rpc, request, role)
        assert code in ALLOWED, f"{rpc} ended with {code.name}: {details!r}"
        assert "\n" not in details and "\r" not in details, f"{rpc}: a message of more than one line: {details!r}"
        after = self.tree()
        assert self.namespaces() <= spaces | {self.ns}, f"{rpc} created a namespace: {self.namespaces() - spaces}"
        if code != grpc.StatusCode.OK:
            changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
            assert not changed, f"{rpc} was refused ({code.name}: {details}) but changed {sorted(changed)}"
        else:
            for path, (data, version) in after.items():
                if before.get(path) == (data, version):
                    continue
                decode = _decoder(self.ns, path)
                if decode is not None:
                    try:
                        decode(data)
                    except RecordError as exc:
                        raise AssertionError(f"{rpc} wrote {path} that the registry refuses: {exc}: {data[:200]!r}") from None
        if len(after) > MAX_ZNODES:
            self.seed()
        return code

    def close(self) -> None:
        self.channel.close()
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        self.kz.stop()
        self.kz.close()


# --- requests --------------------------------------------------------------------------------

ODD = ("", " ", ".", "..", "/", "../catalog", "catalog/..", "catalog/instances", "a/b", "catalog\x00", "\x00",
       "Catalog", "catalog ", "-catalog", "a" * 64, "a" * 10_000, "ñ", "é\u0301", "\u202ecatalog",
       "\U0001f600", "\n", "catalog\nx", "%2e%2e", "zookeeper", "_alerts", "*", "default")


def _odd_text(max_size: int = 20) -> st.SearchStrategy[str]:
    return st.sampled_from(ODD) | st.text(max_size=max_size)


def _json_values(depth: int = 2) -> st.SearchStrategy[Any]:
    scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
               | _odd_text() | st.sampled_from(("ALLOW", "DENY", "STRICT", "GET", "/api/", "v1", "30s", "ns:ops",
                                                "spiffe://meshkeeper.local/ns/x/sa/y", "error_ratio", 100, 50, -1)))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(_odd_text(8), inner, max_size=4), max_leaves=12)


def _mutate_doc(draw: st.DrawFn, doc: Any, depth: int = 0) -> Any:
    """``doc`` with one value somewhere replaced, a key added or removed."""
    if isinstance(doc, dict) and doc and depth < 6:
        key = draw(st.sampled_from(sorted(doc)))
        op = draw(st.sampled_from(("into", "into", "replace", "drop", "add")))
        out = dict(doc)
        if op == "into":
            out[key] = _mutate_doc(draw, doc[key], depth + 1)
        elif op == "replace":
            out[key] = draw(_json_values())
        elif op == "drop":
            del out[key]
        else:
            out[draw(_odd_text(8))] = draw(_json_values())
        return out
    if isinstance(doc, list) and doc and depth < 6:
        i = draw(st.integers(0, len(doc) - 1))
        out = list(doc)
        op = draw(st.sampled_from(("into", "replace", "drop", "grow")))
        if op == "into":
            out[i] = _mutate_doc(draw, doc[i], depth + 1)
        elif op == "replace":
            out[i] = draw(_json_values())
        elif op == "drop":
            del out[i]
        else:
            out.extend([doc[i]] * draw(st.integers(1, 300)))
        return out
    return draw(_json_values())


@st.composite
def json_documents(draw: st.DrawFn) -> str:
    """A JSON request field: a valid document of the kinds the API takes, mutated, or something
    that is not one: not an object, nested past the parser's depth, megabytes long, not JSON."""
    kind = draw(st.integers(0, 11))
    if kind <= 5:
        doc = draw(st.sampled_from((POLICY, AUTHZ, ALERT, {"action": "DENY", "rules": [{"paths": ["/admin"]}]},
                                    {"retry": {"attempts": 3, "on": ["5xx"]}}, {})))
        for _ in range(draw(st.integers(0 if kind == 0 else 1, 3))):
            doc = _mutate_doc(draw, doc)
        return json.dumps(doc, ensure_ascii=draw(st.booleans()))
    if kind == 6:
        return json.dumps(draw(_json_values()))
    if kind == 7:
        depth = draw(st.sampled_from((100, 1_000, 100_000)))
        opener, closer = draw(st.sampled_from((("[", "]"), ('{"a":', "}"), ('{"rules":[', "]}"))))
        return opener * depth + "1" + closer * draw(st.sampled_from((depth, 0)))
    if kind == 8:  # long: many rules, or one huge string
        n = draw(st.sampled_from((1_000, 5_000, 30_000)))  # 30,000 rules: past MAX_AUTHZ_BYTES
        if draw(st.booleans()):
            return json.dumps({"action": "ALLOW", "rules": [{"paths": [f"/p{i}"]} for i in range(n)]})
        return json.dumps({"retry": {"attempts": 2}, "x": "y" * (n * 10)})
    if kind == 9:
        return draw(st.sampled_from(("", " ", "null", "[]", "1", '"x"', "{", "{}}", "\x00", "\ufeff{}", "NaN",
                                     '{"a": NaN}', '{"\\ud800": 1}', '{"rules": [{"paths": ["\\udfff"]}], "action": "ALLOW"}',
                                     '{"action": "ALLOW", "action": "DENY", "rules": []}')))
    return draw(st.text(max_size=40))


def _refused_name(name: str) -> bool:
    try:
        validate_name("namespace", name)
    except RecordError:
        return True
    return False


_BAD_NAMESPACES = tuple(n for n in ODD if n and _refused_name(n))


def namespaces(ns: str) -> st.SearchStrategy[str]:
    """The seeded namespace, or one the registry refuses (never empty: that is ``default``)."""
    spoilt = st.tuples(st.text(max_size=10), st.sampled_from(("/", "..", "\x00", "A", " ", "_")), st.text(max_size=10))
    return st.just(ns) | st.just(ns) | st.sampled_from(_BAD_NAMESPACES) | spoilt.map("".join) | st.just(ns + "/..")


def _services() -> st.SearchStrategy[str]:
    return st.sampled_from(("catalog", "catalog", "db", "legacy", "ghost")) | _odd_text()


def _versions() -> st.SearchStrategy[int | None]:
    return st.none() | st.sampled_from((-1, 0, 1, 2, -2, 2**31 - 1, -(2**31))) | st.integers(-(2**31), 2**31 - 1)


_INT32 = st.sampled_from((0, 1, 5, 100, 10_000, 10_001, -1, 2**31 - 1, -(2**31))) | st.integers(-(2**31), 2**31 - 1)
_ADDRESSES = st.sampled_from((*INSTANCES, GHOST, "10.0.0.3:8080", "10.0.0.1:0", "10.0.0.1:65536", "10.0.0.1",
                              ":8080", "[::1]:8080", "10.0.0.1:8080/..", "../10.0.0.1:8080")) | _odd_text()
_ALERT_NAMES = st.sampled_from(("high-errors", "new-rule", "ghost")) | _odd_text()
_MODES = st.sampled_from(("STRICT", "PERMISSIVE", "DISABLE", "UNSET", "strict", "")) | _odd_text()
_VALUES = st.dictionaries(st.sampled_from(("color", "feature.x", "a.b-c_d", "x" * 300)) | _odd_text(),
                          st.sampled_from(("blue", "", "x" * 70_000)) | _odd_text(), max_size=5) | \
    st.builds(lambda n: {f"k{i}": "v" for i in range(n)}, st.sampled_from((200, 2_000)))
_SPLITS = st.dictionaries(st.sampled_from(("v1", "v2", "v3")) | _odd_text(), _INT32, max_size=4)
_KINDS = st.lists(st.sampled_from(("admin_write", "nack", "alert")) | _odd_text(), max_size=3)

# rpc -> {field: strategy}; the namespace is added to every request that has one.
FIELDS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "ListServices": {},
    "GetService": {"service": _services()},
    "SetWeight": {"service": _services(), "address": _ADDRESSES, "weight": _INT32, "expected_version": _versions()},
    "SetEnabled": {"service": _services(), "address": _ADDRESSES, "enabled": st.booleans(),
                   "expected_version": _versions()},
    "ClearOverride": {"service": _services(), "address": _ADDRESSES, "expected_version": _versions()},
    "GetPolicy": {"service": _services()},
    "SetPolicy": {"service": _services(), "json": json_documents(), "expected_version": _versions()},
    "SetTrafficSplit": {"service": _services(), "split": _SPLITS, "expected_version": _versions()},
    "GetConfig": {"service": _services()},
    "SetConfig": {"service": _services(), "values": _VALUES, "expected_version": _versions()},
    "DeleteConfigKey": {"service": _services(), "key": st.sampled_from(("color", "feature.x", "none")) | _odd_text(),
                        "expected_version": _versions()},
    "ListProxies": {},
    "GetProxyConfig": {"node_id": _odd_text()},
    "ListAlerts": {"name": st.just("") | _ALERT_NAMES},
    "SetAlert": {"name": _ALERT_NAMES, "json": json_documents(), "expected_version": _versions()},
    "DeleteAlert": {"name": _ALERT_NAMES, "expected_version": _versions()},
    "IssueIdentityToken": {"service": _services()},
    "GetAuthz": {"service": _services()},
    "SetAuthz": {"service": _services(), "json": json_documents(), "expected_version": _versions()},
    "DeleteAuthz": {"service": _services(), "expected_version": _versions()},
    "GetPeerAuthentication": {"service": st.just("") | _services()},
    "SetPeerAuthentication": {"service": st.just("") | _services(), "mode": _MODES, "expected_version": _versions()},
    "DeletePeerAuthentication": {"service": st.just("") | _services(), "expected_version": _versions()},
    "WatchEvents": {"kinds": _KINDS},
}
REQUESTS = {name: getattr(pb, f"{name}Request") for name in FIELDS}
# Half the requests take these for the fields they have (a request that could be accepted: only its
# JSON, values, numbers or mode are fuzzed), so that accepted writes are checked too.
PLAIN: dict[str, st.SearchStrategy[Any]] = {
    "service": st.sampled_from(("catalog", "catalog", "db", "legacy")),
    "address": st.sampled_from((*INSTANCES, GHOST)),
    "name": st.sampled_from(("high-errors", "new-rule")),
    "weight": st.integers(0, 10_000) | _INT32,
    "split": st.sampled_from(({"v1": 50, "v2": 50}, {"v1": 100}, {}, {"v2": 100, "v1": 0})) | _SPLITS,
    "values": st.dictionaries(st.sampled_from(("color", "feature.x", "retries")), st.text(max_size=8), min_size=1,
                              max_size=3) | _VALUES,
    "key": st.sampled_from(("color", "feature.x")),
    "mode": st.sampled_from(("STRICT", "PERMISSIVE", "DISABLE")) | _MODES,
    "expected_version": st.none() | st.none() | _versions(),
}
_VALID_JSON = st.sampled_from((POLICY, AUTHZ, ALERT, {"action": "DENY", "rules": [{"paths": ["/admin"]}]},
                               {"service": "db", "condition": "p99_latency_ms", "threshold": 250},
                               {"retry": {"attempts": 3, "on": ["5xx"]}}, {})).map(json.dumps)


@st.composite
def requests(draw: st.DrawFn, ns: str) -> tuple[str, Any, str | None]:
    """(RPC, request, role: admin mostly, else another role, no token or a token nobody has)."""
    rpc = draw(st.sampled_from(sorted(FIELDS)))
    cls = REQUESTS[rpc]
    kwargs: dict[str, Any] = {}
    plain = draw(st.booleans())
    if "namespace" in cls.DESCRIPTOR.fields_by_name:
        kwargs["namespace"] = ns if plain else draw(namespaces(ns))
    for name, strategy in FIELDS[rpc].items():
        if plain and name == "json":
            strategy = _VALID_JSON | strategy
        elif plain and name in PLAIN:
            strategy = PLAIN[name]
        value = draw(strategy)
        if value is not None:
            kwargs[name] = value
    role = "admin" if plain else draw(st.sampled_from(("admin",) * 3 + ("operator", "viewer", None,
                                                                         "not-a-token-0123456789")))
    return rpc, cls(**kwargs), role


def unknown_rpcs() -> list[str]:
    """The service's unary and streaming RPCs that FIELDS does not cover (a new one must be added)."""
    methods = pb.DESCRIPTOR.services_by_name["AdminService"].methods_by_name
    return sorted(set(methods) - set(FIELDS))
