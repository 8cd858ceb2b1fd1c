"""What the verbs print: kubectl-style tables for people (rich), documents for scripts.

Tables go to stdout, as wide as their rows (node ids never wrap or get cut), without trailing blanks;
bold headers on a terminal, plain text in a pipe, a file or a test.
``-o json`` is protobuf's JSON mapping with the proto field names and every field printed.
"""

from __future__ import annotations

import datetime
import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table
from rich.text import Text

from meshkeeper.admin.v1 import admin_pb2 as pb
from meshkeeper.xds import SHORT_TYPE

WIDE = 4096  # columns when stdout is not a terminal
XDS_TYPES = ("CDS", "LDS", "EDS", "RDS", "RTDS")  # proxy-status column order
CONFIG_TYPES = ("CDS", "EDS", "LDS", "RDS", "RTDS")  # proxy-config section order


def write(text: str) -> None:
    sys.stdout.write(text)


def note(text: str) -> None:
    """A remark for people ("No services found ..."): stderr, so that stdout stays parseable."""
    sys.stderr.write(text + "\n")


# --------------------------------------------------------------------------- documents


def to_dict(msg: Message) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def to_json(msg: Message, indent: int | None = 2) -> str:
    return json_format.MessageToJson(msg, preserving_proto_field_name=True, indent=indent,
                                     always_print_fields_with_no_presence=True)


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=False, allow_unicode=True)


def document(fmt: str, obj: Message | Mapping[str, Any]) -> bool:
    """Print ``obj`` as one JSON or YAML document when ``fmt`` asks for one; False for tables."""
    if fmt == "table":
        return False
    data = to_dict(obj) if isinstance(obj, Message) else obj
    write(json.dumps(data, indent=2, ensure_ascii=False) + "\n" if fmt == "json" else dump_yaml(data))
    return True


# --------------------------------------------------------------------------- tables


def _console() -> Console:
    """Tables are as wide as their rows, like kubectl's: a cell never wraps or gets cut (a terminal
    narrower than a row wraps the line). Bold headers on a terminal, plain text anywhere else."""
    if getattr(sys.stdout, "isatty", lambda: False)():
        return Console(file=sys.stdout, width=WIDE, force_terminal=True, highlight=False)
    return Console(file=sys.stdout, width=WIDE, force_terminal=False, color_system=None,
                   no_color=True, highlight=False)


def new_table(*headers: str) -> Table:
    table = Table(box=None, show_edge=False, pad_edge=False, padding=(0, 3, 0, 0),
                  header_style="bold", highlight=False)
    for h in headers:
        table.add_column(h, overflow="fold")
    return table


def add_row(table: Table, *cells: object) -> None:
    # Text: a '[' in a value is not rich markup
    table.add_row(*(c if isinstance(c, Text) else Text(str(c)) for c in cells))


def print_table(table: Table) -> None:
    console = _console()
    with console.capture() as cap:
        console.print(table)
    write("".join(line.rstrip() + "\n" for line in cap.get().splitlines()))


# --------------------------------------------------------------------------- formatting


def age(seconds: float) -> str:
    """A duration as kubectl shows ages: ``45s``, ``3m20s``, ``2h5m``, ``3d``."""
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    m = s // 60
    if m < 10:
        return f"{m}m{s % 60}s"
    if m < 180:
        return f"{m}m"
    h = m // 60
    if h < 8:
        return f"{h}h{m % 60}m"
    if h < 48:
        return f"{h}h"
    d = h // 24
    if d < 8:
        return f"{d}d{h % 24}h"
    return f"{d}d" if d < 730 else f"{d // 365}y"


def _seconds(ts: Any) -> float | None:
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    return ts.seconds + ts.nanos / 1e9


def timestamp(ts: Any) -> str:
    s = _seconds(ts)
    if s is None:
        return "-"
    return datetime.datetime.fromtimestamp(int(s), datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def short_type(t: str) -> str:
    """``CDS`` for ``cds``, ``CDS`` or the Cluster type URL."""
    return SHORT_TYPE.get(t, t.upper())


# --------------------------------------------------------------------------- registry


def services(items: Sequence[pb.ServiceSummary]) -> None:
    table = new_table("NAMESPACE", "NAME", "PROTOCOL", "INSTANCES", "SERVING", "POLICY", "MTLS", "AUTHZ")
    for s in items:
        add_row(table, s.namespace, s.name, s.protocol or "-", s.instances, s.serving,
                "custom" if s.has_policy else "default", s.mtls_mode or "-", s.authz or "-")
    print_table(table)


def _weights(ep: pb.Endpoint) -> str:
    override = ep.override.weight if ep.HasField("override") and ep.override.HasField("weight") else None
    return f"{ep.registered_weight}/{'-' if override is None else override}/{ep.effective_weight}"


def _latency(seconds: float) -> str:
    return f"{seconds * 1000:.1f}ms" if seconds < 1 else f"{seconds:.2f}s"


def endpoints(items: Iterable[pb.Endpoint]) -> None:
    table = new_table("ADDRESS", "VERSION", "ZONE", "WEIGHT(REG/OVR/EFF)", "ENABLED", "REGISTERED",
                      "RPS", "ERR%", "LATENCY")
    for ep in items:
        if ep.HasField("load"):
            load = (f"{ep.load.rps:.1f}", f"{ep.load.error_ratio * 100:.1f}%", _latency(ep.load.mean_latency_seconds))
        else:
            load = ("-", "-", "-")
        add_row(table, ep.address, ep.labels.get("version") or "-", ep.labels.get("zone") or "-",
                _weights(ep), "yes" if ep.enabled else "no", "yes" if ep.registered else "no", *load)
    print_table(table)


# --------------------------------------------------------------------------- proxies


def sync_state(status: pb.TypeStatus | None) -> str:
    """proxy-status's words: NACKED, SYNCED (acked == sent), STALE (not acked yet) or NOT SENT."""
    if status is not None and status.last_nack_error:
        return "NACKED"
    if status is None or not status.version_sent:
        return "NOT SENT"
    return "SYNCED" if status.version_acked == status.version_sent else "STALE"


_STATE_STYLES = {"SYNCED": "green", "STALE": "yellow", "NACKED": "bold red", "NOT SENT": "dim"}


def _state(status: pb.TypeStatus | None) -> Text:
    state = sync_state(status)
    return Text(state, style=_STATE_STYLES[state])


def proxies(items: Sequence[pb.Proxy], now: float, namespaces: bool) -> None:
    headers = ["NAME", *(["NAMESPACE"] if namespaces else []), "SERVICE", "INSTANCE", *XDS_TYPES, "CONNECTED"]
    table = new_table(*headers)
    nacks: list[str] = []
    for p in items:
        by_type = {short_type(t.type): t for t in p.types}
        since = _seconds(p.connected_since)
        add_row(table, p.node_id, *([p.namespace or "-"] if namespaces else []), p.service or "-",
                p.instance or "-", *(_state(by_type.get(t)) for t in XDS_TYPES),
                "-" if since is None else age(now - since))
        for t, status in by_type.items():
            if status.last_nack_error:
                version = f" version {status.last_nack_version}" if status.last_nack_version else ""
                nacks.append(f"{p.node_id} {t} NACKED{version}: {' '.join(status.last_nack_error.split())}")
    print_table(table)
    if nacks:
        write("\n" + "".join(line + "\n" for line in nacks))


# --------------------------------------------------------------------------- policy and config


class _Loader(yaml.SafeLoader):
    """YAML 1.2's booleans: only true/false. Under YAML 1.1 the key ``on`` of ``retry.on``
    would load as the boolean True."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass


def policy_yaml(p: pb.Policy) -> str:
    try:
        body = json.loads(p.json or "{}")
    except ValueError:
        return f"# {p.service}.{p.namespace}: the control plane sent a policy that is not JSON\n{p.json}\n"
    if p.version < 0:
        head = f"# {p.service}.{p.namespace}: no policy set, the defaults apply\n"
    else:
        head = f"# {p.service}.{p.namespace}: policy version {p.version}\n"
    return head + dump_yaml(body)


def authz_yaml(a: pb.Authz) -> str:
    where = f"{a.service}.{a.namespace}"
    if a.version < 0:
        return f"# {where}: no authz policy, every caller is allowed (peer authentication still applies)\n"
    if a.error:
        return (f"# {where}: authz version {a.version} does not validate, the control plane ignores it: "
                f"{' '.join(a.error.split())}\n" + "".join(f"# {line}\n" for line in a.json.splitlines()))
    try:
        body = json.loads(a.json)
    except ValueError:
        return f"# {where}: the control plane sent an authz policy that is not JSON\n# {a.json}\n"
    return f"# {where}: authz version {a.version}\n" + dump_yaml(body)


def peer_authentication(items: Sequence[pb.PeerAuthentication]) -> None:
    table = new_table("NAMESPACE", "SERVICE", "MODE", "VERSION", "EFFECTIVE", "FROM")
    for p in items:
        mode = p.mode or ("invalid" if p.error else "-")
        add_row(table, p.namespace, p.service or "-", mode, p.version if p.version >= 0 else "-",
                p.effective_mode, p.effective_from)
    print_table(table)
    for p in items:
        if p.error:
            note(f"The stored peer authentication does not validate, the control plane ignores it: "
                 f"{' '.join(p.error.split())}")


def config(values: Mapping[str, str]) -> None:
    table = new_table("KEY", "VALUE")
    for k in sorted(values):
        add_row(table, k, values[k])
    print_table(table)


# --------------------------------------------------------------------------- proxy-config


def _get(d: Any, name: str, default: Any = None) -> Any:
    """A field of protobuf JSON written with either field names (snake) or JSON names (camel)."""
    if not isinstance(d, Mapping):
        return default
    if name in d:
        return d[name]
    head, *rest = name.split("_")
    return d.get(head + "".join(w.title() for w in rest), default)


def _socket(address: Any) -> tuple[str, str]:
    sa = _get(address, "socket_address", {})
    return str(_get(sa, "address", "-")), str(_get(sa, "port_value", "-"))


def _clusters(resources: Mapping[str, Any]) -> Table:
    table = new_table("NAME", "TYPE", "LB POLICY", "OUTLIER DETECTION")
    for name, c in resources.items():
        add_row(table, name, _get(c, "type", "STATIC"), _get(c, "lb_policy", "ROUND_ROBIN"),
                "yes" if _get(c, "outlier_detection") is not None else "no")
    return table


def _load_assignments(resources: Mapping[str, Any]) -> Table:
    table = new_table("CLUSTER", "ENDPOINT", "ZONE", "WEIGHT", "HEALTH")
    for name, cla in resources.items():
        rows = 0
        for locality in _get(cla, "endpoints", []) or []:
            zone = _get(_get(locality, "locality", {}), "zone") or "-"
            for lb in _get(locality, "lb_endpoints", []) or []:
                host, port = _socket(_get(_get(lb, "endpoint", {}), "address", {}))
                add_row(table, name, f"{host}:{port}", zone, _get(lb, "load_balancing_weight", "-"),
                        _get(lb, "health_status", "UNKNOWN"))
                rows += 1
        if not rows:
            add_row(table, name, "-", "-", "-", "-")
    return table


def _hcm_route(listener: Any) -> str:
    for chain in _get(listener, "filter_chains", []) or []:
        for f in _get(chain, "filters", []) or []:
            cfg = _get(f, "typed_config", {})
            rds = _get(cfg, "rds")
            if rds is not None:
                return str(_get(rds, "route_config_name", "-"))
            inline = _get(cfg, "route_config")
            if inline is not None:
                return f"{_get(inline, 'name', '')} (inline)".strip()
    return "-"


def _listeners(resources: Mapping[str, Any]) -> Table:
    table = new_table("NAME", "ADDRESS", "PORT", "ROUTE")
    for name, lis in resources.items():
        host, port = _socket(_get(lis, "address", {}))
        add_row(table, name, host, port, _hcm_route(lis))
    return table


def _destination(route: Any) -> str:
    action = _get(route, "route", {})
    weighted = _get(action, "weighted_clusters")
    if weighted is not None:
        return ", ".join(f"{_get(c, 'name', '?')} {_get(c, 'weight', 0)}"
                         for c in _get(weighted, "clusters", []) or [])
    if _get(action, "cluster") is not None:
        return str(_get(action, "cluster"))
    return "-"


def _match(route: Any) -> str:
    m = _get(route, "match", {})
    for kind in ("prefix", "path", "path_separated_prefix"):
        if _get(m, kind) is not None:
            return f"{kind}:{_get(m, kind)}"
    return "-"


def _routes(resources: Mapping[str, Any]) -> Table:
    table = new_table("NAME", "VIRTUAL HOST", "DOMAINS", "MATCH", "DESTINATION")
    for name, rc in resources.items():
        for vh in _get(rc, "virtual_hosts", []) or []:
            domains = _domains(_get(vh, "domains", []) or [])
            for r in _get(vh, "routes", []) or [{}]:
                add_row(table, name, _get(vh, "name", "-"), domains, _match(r), _destination(r))
    return table


def _runtimes(resources: Mapping[str, Any]) -> Table:
    table = new_table("NAME", "KEY", "VALUE")
    for name, rt in resources.items():
        layer = _get(rt, "layer", {}) or {}
        if not layer:
            add_row(table, name, "-", "-")
        for k in sorted(layer):
            v = layer[k]
            add_row(table, name, k, v if isinstance(v, str) else json.dumps(v))
    return table


_SUMMARIES = {"CDS": _clusters, "EDS": _load_assignments, "LDS": _listeners, "RDS": _routes, "RTDS": _runtimes}


def parse_resources(acked: pb.AckedResources) -> dict[str, Any]:
    """Resource name -> the parsed Envoy JSON (the raw text when it does not parse), by name."""
    out: dict[str, Any] = {}
    for name in sorted(acked.resources_json):
        text = acked.resources_json[name]
        try:
            out[name] = json.loads(text)
        except ValueError:
            out[name] = text
    return out


def proxy_config_document(cfg: pb.ProxyConfig, types: Sequence[pb.AckedResources]) -> dict[str, Any]:
    return {"node_id": cfg.node_id,
            "types": [{"type": short_type(t.type), "version": t.version, "resources": parse_resources(t)}
                      for t in types]}


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def proxy_config(cfg: pb.ProxyConfig, types: Sequence[pb.AckedResources]) -> None:
    for i, acked in enumerate(types):
        t = short_type(acked.type)
        write(("\n" if i else "") + f"{t} (version {acked.version or '-'}, {_count(len(acked.resources_json), 'resource')})\n")
        summary = _SUMMARIES.get(t)
        resources = parse_resources(acked)
        if summary is None:
            table = new_table("NAME")
            for name in resources:
                add_row(table, name)
        else:
            table = summary(resources)
        print_table(table)


# --------------------------------------------------------------------------- alerts


def alerts(items: Sequence[pb.Alert], now: float) -> None:
    table = new_table("NAME", "SERVICE", "CONDITION", "FOR", "SEVERITY", "STATE", "VALUE", "SINCE")
    for a in items:
        since = a.active_since if a.state in ("pending", "firing") else a.resolved_at
        when = _seconds(since)
        add_row(table, a.name, a.service or "-", a.condition or a.error or "-", a.for_duration or "-",
                a.severity or "-", a.state, f"{a.value:.4g}" if a.HasField("value") else "-",
                age(now - when) if when else "-")
    print_table(table)


# --------------------------------------------------------------------------- events


def event_line(ev: pb.Event) -> str:
    where = f"{ev.namespace}/{ev.service}" if ev.service else (ev.namespace or "-")
    parts = [timestamp(ev.at), f"{ev.kind:<11}", where]
    if ev.node_id:
        parts.append(ev.node_id)
    if ev.who:
        parts.append(f"by {ev.who}")
    if ev.summary:
        parts.append(" ".join(ev.summary.split()))
    return "  ".join(parts)


def _domains(domains: list[str], shown: int = 2) -> str:
    """The first domains and how many more, as istioctl shows them (``-o json`` has them all)."""
    if not domains:
        return "-"
    more = len(domains) - shown
    return ", ".join(domains[:shown]) + (f" + {more} more" if more > 0 else "")
