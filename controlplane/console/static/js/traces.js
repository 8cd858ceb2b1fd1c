// Trace search over the trace store's Jaeger API (/api/traces): service, operation, tags (logfmt, as
// Jaeger's UI: key=value key2="a b"), min/max duration, time window, errors only. Results as a
// scatter of duration over time (plain SVG) and a list; the query is kept in the URL.

import { get } from "./api.js";
import { fmt, h, link, table } from "./dom.js";
import { navigate } from "./app.js";

const SVG = "http://www.w3.org/2000/svg";
const LOOKBACKS = ["5m", "15m", "1h", "6h", "24h"];

function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

// logfmt -> {key: value}; values may be quoted.
export function parseTags(text) {
  const out = {};
  const re = /([^\s=]+)=("((?:[^"\\]|\\.)*)"|\S*)/g;
  let m;
  while ((m = re.exec(text)) !== null) out[m[1]] = m[3] !== undefined ? m[3].replace(/\\(.)/g, "$1") : m[2];
  return out;
}

function summary(t) {
  const spans = [...t.spans].sort((a, b) => a.startTime - b.startTime);
  const root = spans.find((s) => !s.references.some((r) => r.refType === "CHILD_OF" && t.spans.some((p) => p.spanID === r.spanID))) || spans[0];
  const end = Math.max(...t.spans.map((s) => s.startTime + s.duration));
  const error = t.spans.some((s) => s.tags.some((g) => g.key === "error" && g.value === true));
  return { id: t.traceID, root, service: t.processes[root.processID].serviceName, start: spans[0].startTime,
    duration: end - spans[0].startTime, spans: t.spans.length, error,
    services: [...new Set(t.spans.map((s) => t.processes[s.processID].serviceName))] };
}

function scatter(results) {
  const W = 900, H = 220, L = 70, B = 30;
  const plot = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "scatter", id: "scatter", role: "img" });
  if (!results.length) return plot;
  const t0 = Math.min(...results.map((r) => r.start)), t1 = Math.max(...results.map((r) => r.start));
  const dmax = Math.max(...results.map((r) => r.duration)) || 1;
  const x = (t) => L + (t1 === t0 ? (W - L) / 2 : ((t - t0) / (t1 - t0)) * (W - L - 20));
  const y = (d) => H - B - (d / dmax) * (H - B - 15);
  plot.append(svg("line", { x1: L, y1: H - B, x2: W, y2: H - B, class: "axis" }), svg("line", { x1: L, y1: 5, x2: L, y2: H - B, class: "axis" }),
    svg("text", { x: L - 6, y: 15, "text-anchor": "end", class: "tick" }, fmt.micros(dmax)),
    svg("text", { x: L - 6, y: H - B, "text-anchor": "end", class: "tick" }, "0"),
    svg("text", { x: L, y: H - 8, class: "tick" }, fmt.time(t0)),
    svg("text", { x: W - 5, y: H - 8, "text-anchor": "end", class: "tick" }, fmt.time(t1)));
  for (const r of results) {
    const dot = svg("circle", { cx: x(r.start), cy: y(r.duration), r: 4 + Math.min(6, r.spans), class: r.error ? "dot error" : "dot", "data-trace": r.id },
      svg("title", {}, `${r.service}: ${r.root.operationName} ${fmt.micros(r.duration)}`));
    dot.addEventListener("click", () => navigate(`/ui/traces/${r.id}`));
    plot.append(dot);
  }
  return plot;
}

export function render(main) {
  const q = new URLSearchParams(location.search);
  const field = (name, attrs = {}) => h("input", { name, id: `q-${name}`, value: q.get(name) || "", ...attrs });
  const service = h("select", { name: "service", id: "q-service" });
  const operation = h("select", { name: "operation", id: "q-operation" }, h("option", { value: "" }, "all operations"));
  const lookback = h("select", { name: "lookback", id: "q-lookback" }, LOOKBACKS.map((l) => h("option", { value: l, selected: (q.get("lookback") || "1h") === l }, `last ${l}`)));
  const errors = h("input", { type: "checkbox", name: "errors", id: "q-errors", checked: q.get("errors") === "1" });
  const form = h("form", { id: "trace-search", class: "search" },
    h("label", {}, "service ", service), h("label", {}, "operation ", operation),
    h("label", {}, "tags ", field("tags", { placeholder: 'url.path=/shop http.response.status_code=200', size: 34 })),
    h("label", {}, "min ", field("minDuration", { placeholder: "e.g. 10ms", size: 7 })),
    h("label", {}, "max ", field("maxDuration", { placeholder: "e.g. 1.2s", size: 7 })),
    lookback, h("label", {}, errors, " errors only"),
    h("label", {}, "limit ", field("limit", { size: 4, placeholder: "20" })),
    h("button", { type: "submit", id: "q-submit" }, "Find traces"));
  const out = h("div", { id: "trace-results" });
  main.append(h("h2", {}, "Traces"), form, out);

  async function operations() {
    operation.replaceChildren(h("option", { value: "" }, "all operations"));
    if (!service.value) return;
    const r = await get(`/api/services/${encodeURIComponent(service.value)}/operations`);
    if (r.ok) for (const op of r.data.data) operation.append(h("option", { value: op, selected: op === q.get("operation") }, op));
  }

  async function search() {
    const params = new URLSearchParams({ service: service.value, lookback: lookback.value, limit: form.elements.limit.value || "20" });
    if (operation.value) params.set("operation", operation.value);
    for (const k of ["minDuration", "maxDuration"]) if (form.elements[k].value.trim()) params.set(k, form.elements[k].value.trim());
    const tags = parseTags(form.elements.tags.value);
    if (errors.checked) tags.error = "true";
    if (Object.keys(tags).length) params.set("tags", JSON.stringify(tags));
    out.replaceChildren(h("p", { class: "muted" }, "searching …"));
    const r = await get(`/api/traces?${params}`);
    if (!r.ok) return out.replaceChildren(h("p", { class: "error", id: "search-error" }, r.error));
    const results = r.data.data.map(summary).sort((a, b) => b.start - a.start);
    const rows = results.map((s) => h("tr", { "data-trace": s.id, class: s.error ? "error" : "" },
      h("td", {}, link(`/ui/traces/${s.id}`, s.id)), h("td", {}, `${s.service}: ${s.root.operationName}`),
      h("td", {}, s.services.join(", ")), h("td", {}, String(s.spans)), h("td", {}, fmt.micros(s.duration)),
      h("td", {}, fmt.time(s.start)), h("td", {}, s.error ? "error" : "")));
    out.replaceChildren(h("p", { class: "muted" }, `${results.length} traces`), scatter(results),
      table(["trace", "root", "services", "spans", "duration", "start", ""], rows, { id: "trace-list" }));
  }

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const keep = new URLSearchParams();
    for (const [k, v] of new FormData(form)) if (v) keep.set(k, k === "errors" ? "1" : v);
    history.replaceState(null, "", `/ui/traces?${keep}`);
    search();
  });
  service.addEventListener("change", operations);
  get("/api/services").then(async (r) => {
    if (!r.ok) return out.replaceChildren(h("p", { class: "error" }, r.error));
    const names = r.data.data || [];
    for (const n of names) service.append(h("option", { value: n, selected: n === q.get("service") }, n));
    await operations();
    if (q.get("service") && names.includes(q.get("service"))) search();
  });
}
