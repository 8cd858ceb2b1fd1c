// Alert rules (ZooKeeper) and their state as this replica last evaluated them (docs/alerts.md).

import { get, on } from "./api.js";
import { h, table } from "./dom.js";

export function render(main) {
  const body = h("div", { id: "alerts" });
  const recent = h("ul", { id: "alert-events" });
  main.append(h("h2", {}, "Alerts"), body, h("h3", {}, "Transitions seen since this page opened"), recent);
  async function load() {
    const r = await get("/api/alerts");
    if (!r.ok) return body.replaceChildren(h("p", { class: "error" }, r.error));
    const rows = r.data.alerts.map((a) => h("tr", { class: `alert ${a.state}`, "data-alert": `${a.namespace}/${a.name}` },
      h("td", {}, a.namespace), h("td", {}, a.name), h("td", {}, a.service), h("td", {}, a.condition),
      h("td", {}, a.for), h("td", {}, a.severity), h("td", { class: "state" }, a.state),
      h("td", {}, a.value === null ? "no data" : Number(a.value).toPrecision(4)),
      h("td", {}, a.fired_at || "–"), h("td", {}, a.resolved_at || "–"), h("td", {}, a.summary)));
    body.replaceChildren(rows.length ? table(["namespace", "name", "service", "condition", "for", "severity", "state", "value", "fired", "resolved", "summary"], rows)
      : h("p", { class: "muted" }, "no alert rules (meshkeeper alert set …)"));
  }
  load();
  const offs = [
    on("mesh", (e) => {
      if (e.kind !== "alert") return;
      recent.prepend(h("li", { class: e.state }, `${e.at} ${e.summary}`));
      load();
    }),
    on("graph", load),
  ];
  return () => offs.forEach((off) => off());
}
