// Building DOM without HTML strings: text always goes in as text nodes (textContent), never through
// innerHTML, so names, labels and span attributes from ZooKeeper or the trace store cannot inject markup.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

export function table(headers, rows, attrs = {}) {
  return h("table", attrs,
    h("thead", {}, h("tr", {}, headers.map((t) => h("th", {}, t)))),
    h("tbody", {}, rows));
}

export function link(href, ...children) {
  return h("a", { href, "data-nav": true }, ...children);
}

export const fmt = {
  rps: (v) => (v === null || v === undefined ? "–" : `${Number(v).toFixed(v >= 10 ? 1 : 2)} rps`),
  ratio: (v) => (v === null || v === undefined ? "–" : `${(100 * v).toFixed(v >= 0.1 ? 0 : 1)}%`),
  seconds: (v) => (v === null || v === undefined ? "–" : v >= 1 ? `${v.toFixed(2)} s` : `${(v * 1000).toFixed(1)} ms`),
  micros: (us) => (us >= 1e6 ? `${(us / 1e6).toFixed(2)} s` : us >= 1000 ? `${(us / 1000).toFixed(2)} ms` : `${us} µs`),
  time: (us) => new Date(us / 1000).toLocaleTimeString(),
};
