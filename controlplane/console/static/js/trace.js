// One trace as a timeline (waterfall): spans nested under their parents (CHILD_OF), bars placed on
// the trace's time axis; a click opens a span's attributes, process, status and events (logs).

import { get } from "./api.js";
import { fmt, h, table } from "./dom.js";

function tree(trace) {
  const byId = new Map(trace.spans.map((s) => [s.spanID, s]));
  const children = new Map();
  const roots = [];
  for (const s of trace.spans) {
    const parent = s.references.find((r) => r.refType === "CHILD_OF" && byId.has(r.spanID));
    if (parent) {
      if (!children.has(parent.spanID)) children.set(parent.spanID, []);
      children.get(parent.spanID).push(s);
    } else roots.push(s);
  }
  const order = [];
  const walk = (s, depth) => {
    order.push([s, depth]);
    for (const c of (children.get(s.spanID) || []).sort((a, b) => a.startTime - b.startTime)) walk(c, depth + 1);
  };
  for (const r of roots.sort((a, b) => a.startTime - b.startTime)) walk(r, 0);
  return order;
}

function kv(tags) {
  return table(["key", "value"], tags.map((t) => h("tr", {}, h("td", { class: "key" }, t.key), h("td", { class: "value" }, String(t.value)))), { class: "tags" });
}

function details(span, process, t0) {
  const tag = (k) => span.tags.find((t) => t.key === k);
  const status = tag("otel.status_code");
  const events = span.logs.map((l) => h("li", {}, `+${fmt.micros(l.timestamp - t0)} `, l.fields.map((f) => `${f.key}=${f.value}`).join(" ")));
  return h("div", { class: "span-details" },
    h("p", {}, `${process.serviceName} · span ${span.spanID} · start +${fmt.micros(span.startTime - t0)} · ${fmt.micros(span.duration)}`,
      ` · status ${status ? status.value : "UNSET"}`, tag("otel.status_description") ? ` (${tag("otel.status_description").value})` : ""),
    h("h4", {}, "Attributes"), kv(span.tags),
    h("h4", {}, "Process"), kv(process.tags || []),
    h("h4", {}, "Events"), events.length ? h("ul", { class: "events" }, events) : h("p", { class: "muted" }, "none"));
}

export function render(main, { traceID }) {
  const body = h("div", { id: "trace" });
  main.append(h("h2", {}, "Trace ", h("code", {}, traceID)), body);
  get(`/api/traces/${encodeURIComponent(traceID)}`).then((r) => {
    if (!r.ok) return body.replaceChildren(h("p", { class: "error" }, r.error));
    const trace = r.data.data[0];
    const t0 = Math.min(...trace.spans.map((s) => s.startTime));
    const total = Math.max(...trace.spans.map((s) => s.startTime + s.duration)) - t0 || 1;
    const services = [...new Set(trace.spans.map((s) => trace.processes[s.processID].serviceName))];
    const rows = [];
    for (const [span, depth] of tree(trace)) {
      const process = trace.processes[span.processID];
      const error = span.tags.some((t) => t.key === "error" && t.value === true);
      const kind = span.tags.find((t) => t.key === "span.kind");
      const bar = h("div", { class: error ? "bar error" : "bar" });
      bar.style.left = `${(100 * (span.startTime - t0)) / total}%`;
      bar.style.width = `${Math.max(0.3, (100 * span.duration) / total)}%`;
      const name = h("div", { class: "name" }, h("span", { class: "service" }, process.serviceName), " ",
        h("span", { class: "operation" }, span.operationName), kind ? h("span", { class: "muted" }, ` ${kind.value}`) : null);
      name.style.paddingLeft = `${depth * 16 + 4}px`;
      const row = h("div", { class: "span-row", "data-span": span.spanID, "data-service": process.serviceName, tabindex: 0 },
        name, h("div", { class: "timeline" }, bar, h("span", { class: "duration" }, fmt.micros(span.duration))));
      const detail = h("div", { class: "span-detail-slot" });
      row.addEventListener("click", () => (detail.firstChild ? detail.replaceChildren() : detail.replaceChildren(details(span, process, t0))));
      rows.push(row, detail);
    }
    body.replaceChildren(
      h("p", { class: "summary" }, `${services.join(" → ")} · ${trace.spans.length} spans · ${fmt.micros(total)} · started ${new Date(t0 / 1000).toISOString()}`),
      h("div", { class: "waterfall" }, h("div", { class: "span-row head" }, h("div", { class: "name" }, "service · operation"),
        h("div", { class: "timeline" }, `0 … ${fmt.micros(total)}`)), rows));
  });
}
