// The mesh topology, as Kiali draws it: services as nodes coloured by health, caller -> callee edges
// labelled with requests per second, error ratio and p99 latency from LRS. Updated from the live
// feed's graph ticks (every 2 s) without a reload; the same numbers are listed below the graph.

import { get, on } from "./api.js";
import { fmt, h, link, table } from "./dom.js";
import { navigate } from "./app.js";

const COLOURS = { healthy: "#3f9c35", degraded: "#ec7a08", failing: "#cc0000", unknown: "#8a8d90" };

function edgeLabel(r) {
  return `${fmt.rps(r.rps)} · ${fmt.ratio(r.error_ratio)} err · p99 ${fmt.seconds(r.p99_latency_seconds)}`;
}

function elements(doc) {
  const nodes = doc.nodes.map((n) => ({
    group: "nodes",
    data: { id: n.id, label: n.service, colour: COLOURS[n.health] || COLOURS.unknown, ns: n.namespace, registered: n.registered },
  }));
  const edges = doc.edges.map((e) => ({
    group: "edges",
    data: { id: e.id, source: e.source, target: e.target, label: edgeLabel(e.rates), colour: e.rates.error_ratio >= 0.2 ? COLOURS.failing : e.rates.error_ratio >= 0.01 ? COLOURS.degraded : "#6a6e73" },
  }));
  return [...nodes, ...edges];
}

function lists(doc) {
  const nodes = doc.nodes.map((n) =>
    h("tr", { "data-node": n.id, class: n.health },
      h("td", {}, n.registered ? link(`/ui/services/${encodeURIComponent(n.namespace)}/${encodeURIComponent(n.service)}`, n.service) : n.service),
      h("td", {}, n.namespace), h("td", { class: "health" }, n.health),
      h("td", {}, `${n.serving}/${n.instances}`), h("td", { class: "rps" }, fmt.rps(n.rates.rps)),
      h("td", {}, fmt.ratio(n.rates.error_ratio)), h("td", {}, fmt.seconds(n.rates.p99_latency_seconds))));
  const edges = doc.edges.map((e) =>
    h("tr", { "data-edge": e.id },
      h("td", { class: "source" }, e.source), h("td", { class: "target" }, e.target),
      h("td", { class: "rps", "data-rps": e.rates.rps }, fmt.rps(e.rates.rps)),
      h("td", {}, fmt.ratio(e.rates.error_ratio)), h("td", {}, fmt.seconds(e.rates.p99_latency_seconds))));
  return [
    h("h3", {}, "Services"),
    table(["service", "namespace", "health", "serving", "inbound", "errors", "p99"], nodes, { id: "nodes" }),
    h("h3", {}, "Edges (caller → callee, last LRS interval)"),
    table(["caller", "callee", "rate", "errors", "p99"], edges, { id: "edges" }),
  ];
}

export function render(main) {
  const canvas = h("div", { id: "graph", class: "graph" });
  const below = h("div", { id: "graph-lists" });
  const note = h("p", { class: "muted" }, "Load is what the callers' sidecars report over LRS (interval and p99 per edge); click a service to open it.");
  main.append(h("h2", {}, "Mesh"), canvas, note, below);
  const cy = cytoscape({
    container: canvas,
    elements: [],
    wheelSensitivity: 0.3,
    style: [
      { selector: "node", style: { "background-color": "data(colour)", label: "data(label)", color: "#151515", "font-size": 13, "text-valign": "bottom", "text-margin-y": 6, width: 36, height: 36 } },
      { selector: "node[!registered]", style: { shape: "round-rectangle", "background-opacity": 0.5 } },
      { selector: "edge", style: { width: 2, "line-color": "data(colour)", "target-arrow-color": "data(colour)", "target-arrow-shape": "triangle", "curve-style": "bezier", label: "data(label)", "font-size": 11, "text-background-color": "#fff", "text-background-opacity": 0.9, "text-background-padding": 2 } },
    ],
  });
  window.meshkeeperGraph = cy; // for tests and the curious
  cy.on("tap", "node", (e) => {
    const d = e.target.data();
    if (d.registered) navigate(`/ui/services/${encodeURIComponent(d.ns)}/${encodeURIComponent(d.label)}`);
  });
  let shape = "";
  const update = (doc) => {
    const els = elements(doc);
    const ids = els.map((e) => e.data.id).sort().join(" ");
    if (ids !== shape) {
      cy.elements().remove();
      cy.add(els);
      cy.layout({ name: "breadthfirst", directed: true, spacingFactor: 1.2, padding: 30 }).run();
      shape = ids;
    } else {
      for (const e of els) cy.getElementById(e.data.id).data(e.data);
    }
    below.replaceChildren(...lists(doc));
  };
  get("/api/console/graph").then((r) => (r.ok ? update(r.data) : below.replaceChildren(h("p", { class: "error" }, r.error))));
  const off = on("graph", update);
  return () => {
    off();
    cy.destroy();
    delete window.meshkeeperGraph;
  };
}
