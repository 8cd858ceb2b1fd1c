// One service: every endpoint with its weights, switches and live load, the buttons that call the
// admin API (with the user's token; a refusal is shown as the API words it), its policy and runtime
// config, its sidecars and its recent traces from the trace store.

import { get, on, post } from "./api.js";
import { fmt, h, link, table } from "./dom.js";

function weightCell(ep) {
  const o = ep.override && ep.override.weight !== null && ep.override.weight !== undefined ? ep.override.weight : "–";
  return [h("td", { class: "w-registered" }, ep.registered_weight ?? "–"), h("td", { class: "w-override" }, o),
    h("td", { class: "w-effective" }, ep.effective_weight ?? "–")];
}

export function render(main, { namespace, service }) {
  const base = `/api/console/services/${encodeURIComponent(namespace)}/${encodeURIComponent(service)}`;
  const status = h("p", { id: "write-status", role: "status" });
  const body = h("div", { id: "service" });
  const traces = h("div", { id: "service-traces" });
  main.append(h("h2", {}, `${service}`, h("span", { class: "muted" }, ` (namespace ${namespace})`)), status, body,
    h("h3", {}, "Recent traces"), traces);

  async function write(address, action, payload) {
    status.className = "pending";
    status.textContent = `${action} ${address} …`;
    const r = await post(`${base}/endpoints/${encodeURIComponent(address)}/${action}`, payload);
    if (r.ok) {
      status.className = "ok";
      status.textContent = `${r.data.rpc} ${address}: done`;
      load();
    } else {
      status.className = "error";
      status.textContent = `refused (${r.status}): ${r.error}`;
    }
  }

  function endpointRow(ep) {
    const weight = h("input", { type: "number", min: 0, max: 1000, value: ep.effective_weight ?? "", class: "weight", "aria-label": "weight" });
    const actions = h("td", { class: "actions" },
      ep.enabled
        ? h("button", { class: "disable", onclick: () => write(ep.address, "disable") }, "Disable")
        : h("button", { class: "enable", onclick: () => write(ep.address, "enable") }, "Enable"),
      weight, h("button", { class: "set-weight", onclick: () => write(ep.address, "weight", { weight: Number(weight.value) }) }, "Set weight"),
      ep.override ? h("button", { class: "clear", onclick: () => write(ep.address, "clear") }, "Clear override") : null);
    const labels = Object.entries(ep.labels || {}).filter(([k]) => k !== "version" && k !== "zone").map(([k, v]) => `${k}=${v}`).join(" ");
    return h("tr", { "data-address": ep.address, class: ep.serving ? "serving" : "out" },
      h("td", { class: "address" }, ep.address, ep.registered ? null : h("span", { class: "muted" }, " (not registered)")),
      h("td", { class: "version" }, ep.version), h("td", { class: "zone" }, ep.zone), h("td", { class: "labels" }, labels),
      ...weightCell(ep),
      h("td", { class: "enabled" }, ep.enabled ? "yes" : "no"),
      h("td", { class: "serving" }, ep.serving ? "yes" : "no"),
      h("td", { class: "ejected", title: "outlier ejection is decided in each caller's sidecar: see its /clusters" }, ep.ejected === null ? "–" : String(ep.ejected)),
      h("td", { class: "rps" }, fmt.rps(ep.rates.rps)), h("td", {}, fmt.ratio(ep.rates.error_ratio)),
      h("td", {}, fmt.seconds(ep.rates.mean_latency_seconds)), h("td", {}, fmt.seconds(ep.rates.p99_latency_seconds)),
      actions);
  }

  function show(doc) {
    const config = doc.config ? Object.entries(doc.config).map(([k, v]) => h("tr", {}, h("td", {}, k), h("td", {}, v))) : [];
    body.replaceChildren(
      h("p", { class: `summary ${doc.health}` },
        `health ${doc.health} · ${doc.serving}/${doc.instances} serving · ${doc.protocol} · inbound ${fmt.rps(doc.rates.rps)}, `,
        `${fmt.ratio(doc.rates.error_ratio)} errors, p99 ${fmt.seconds(doc.rates.p99_latency_seconds)}`,
        doc.vip ? ` · VIP ${doc.vip}` : ""),
      h("h3", {}, "Endpoints"),
      table(["address", "version", "zone", "labels", "registered", "override", "effective", "enabled", "serving", "ejected",
        "rate", "errors", "mean", "p99", ""], doc.endpoints.map(endpointRow), { id: "endpoints" }),
      h("div", { class: "columns" },
        h("section", {}, h("h3", {}, "Policy"), h("pre", { id: "policy" }, JSON.stringify(doc.policy, null, 2))),
        h("section", {}, h("h3", {}, "Runtime config (RTDS)"),
          config.length ? table(["key", "value"], config, { id: "config" }) : h("p", { class: "muted" }, "none")),
        h("section", {}, h("h3", {}, "Sidecars"),
          h("ul", { id: "proxies" }, doc.proxies.map((id) => h("li", {}, id))))));
  }

  async function load() {
    const r = await get(base);
    if (r.ok) show(r.data);
    else body.replaceChildren(h("p", { class: "error" }, r.error));
  }

  async function loadTraces() {
    const r = await get(`/api/traces?service=${encodeURIComponent(service)}&limit=20&lookback=1h`);
    if (!r.ok) {
      traces.replaceChildren(h("p", { class: "muted" }, r.status === 404 ? "no trace store on this control plane" : r.error));
      return;
    }
    const rows = r.data.data.map((t) => {
      const root = [...t.spans].sort((a, b) => a.startTime - b.startTime)[0];
      const services = [...new Set(t.spans.map((s) => t.processes[s.processID].serviceName))].join(", ");
      return h("tr", {}, h("td", {}, link(`/ui/traces/${t.traceID}`, t.traceID.slice(0, 16))),
        h("td", {}, root.operationName), h("td", {}, services), h("td", {}, String(t.spans.length)),
        h("td", {}, fmt.micros(root.duration)), h("td", {}, fmt.time(root.startTime)));
    });
    traces.replaceChildren(rows.length ? table(["trace", "root operation", "services", "spans", "duration", "start"], rows)
      : h("p", { class: "muted" }, "none in the last hour"));
  }

  load();
  loadTraces();
  let ticks = 0;
  const offGraph = on("graph", () => {
    load();
    if (++ticks % 5 === 0) loadTraces();
  });
  const offMesh = on("mesh", (e) => {
    if (e.namespace === namespace && e.service === service) load();
  });
  return () => {
    offGraph();
    offMesh();
  };
}
