// istioctl proxy-status: per proxy and xDS type SYNCED, STALE or NOT SENT, and the last NACK.

import { get, on } from "./api.js";
import { h, table } from "./dom.js";

const TYPES = ["CDS", "LDS", "EDS", "RDS", "RTDS"];

export function render(main) {
  const body = h("div", { id: "proxy-status" });
  main.append(h("h2", {}, "Proxies"), h("p", { class: "muted" }, "Sidecars connected to this control plane replica."), body);
  async function load() {
    const r = await get("/api/console/proxies");
    if (!r.ok) return body.replaceChildren(h("p", { class: "error" }, r.error));
    const rows = r.data.proxies.map((p) => {
      const nacks = TYPES.map((t) => p.types[t]).filter((s) => s && s.nack).map((s) => s.nack);
      const last = nacks.sort((a, b) => (a.at < b.at ? 1 : -1))[0];
      return h("tr", { "data-node": p.node_id },
        h("td", {}, p.node_id), h("td", {}, `${p.service}.${p.namespace}`),
        ...TYPES.map((t) => h("td", { class: `xds ${p.types[t].status.replace(" ", "-").toLowerCase()}`, title: p.types[t].version_sent || "" }, p.types[t].status)),
        h("td", { class: "nack" }, last ? `${last.at} version ${last.version}: ${last.error}` : "–"));
    });
    body.replaceChildren(rows.length ? table(["proxy", "service", ...TYPES, "last NACK"], rows) : h("p", { class: "muted" }, "no proxy is connected"));
  }
  load();
  const offs = [on("graph", load), on("mesh", (e) => e.kind === "nack" && load())];
  return () => offs.forEach((off) => off());
}
