// The console's router: one page per path, rendered into <main>; links marked data-nav change the
// page without a reload. Each page's render(main, params) returns a function that tears it down.

import { connect, on, token } from "./api.js";
import * as graph from "./graph.js";
import * as service from "./service.js";
import * as proxies from "./proxies.js";
import * as traces from "./traces.js";
import * as trace from "./trace.js";
import * as alerts from "./alerts.js";

const ROUTES = [
  [/^\/$/, graph, () => ({})],
  [/^\/ui\/services\/([^/]+)\/([^/]+)$/, service, (m) => ({ namespace: m[1], service: m[2] })],
  [/^\/ui\/proxies$/, proxies, () => ({})],
  [/^\/ui\/traces$/, traces, () => ({})],
  [/^\/ui\/traces\/([0-9a-fA-F]+)$/, trace, (m) => ({ traceID: m[1] })],
  [/^\/ui\/alerts$/, alerts, () => ({})],
];

let teardown = null;

function route() {
  const main = document.getElementById("main");
  if (teardown) teardown();
  teardown = null;
  main.replaceChildren();
  const path = decodeURIComponent(location.pathname);
  for (const [re, page, params] of ROUTES) {
    const m = path.match(re);
    if (m) {
      teardown = page.render(main, params(m)) || null;
      return;
    }
  }
  main.append(document.createTextNode(`No page ${path}.`));
}

export function navigate(href) {
  history.pushState(null, "", href);
  route();
}

function showToken() {
  document.getElementById("token-state").textContent = token.get() ? "token set" : "no token";
}

document.addEventListener("click", (e) => {
  const a = e.target.closest("a[data-nav]");
  if (!a || e.ctrlKey || e.metaKey || e.shiftKey || e.button !== 0) return;
  e.preventDefault();
  navigate(a.getAttribute("href"));
});
window.addEventListener("popstate", route);

document.getElementById("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const input = document.getElementById("token");
  token.set(input.value.trim());
  input.value = "";
  showToken();
  connect();
  route();
});
document.getElementById("token-forget").addEventListener("click", () => {
  token.set("");
  showToken();
  connect();
  route();
});

on("state", (s) => {
  const el = document.getElementById("live");
  el.textContent = s;
  el.className = `live ${s}`;
});
showToken();
connect();
route();
