// The control plane's JSON API and its live feed. The token the user gives is kept in
// sessionStorage (this tab only) and sent as a bearer token, as the admin API expects.

const KEY = "meshkeeper.token";

export const token = {
  get: () => sessionStorage.getItem(KEY) || "",
  set: (t) => (t ? sessionStorage.setItem(KEY, t) : sessionStorage.removeItem(KEY)),
};

function headers(extra = {}) {
  const t = token.get();
  return t ? { ...extra, Authorization: `Bearer ${t}` } : extra;
}

// {ok, status, data, error}: error is the API's own wording (console JSON or Jaeger's envelope).
async function call(method, path, body) {
  const init = { method, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    return { ok: false, status: 0, data: null, error: `the control plane did not answer (${e.message})` };
  }
  let data = null;
  try {
    data = await resp.json();
  } catch (e) {
    data = null;
  }
  const error = resp.ok ? "" : (data && (data.error || (data.errors && data.errors[0] && data.errors[0].msg))) || resp.statusText;
  return { ok: resp.ok, status: resp.status, data, error };
}

export const get = (path) => call("GET", path);
export const post = (path, body) => call("POST", path, body === undefined ? {} : body);

// One EventSource per tab, shared by the pages: graph ticks and mesh events.
const listeners = { graph: new Set(), mesh: new Set(), state: new Set() };
let source = null;

export function on(kind, fn) {
  listeners[kind].add(fn);
  return () => listeners[kind].delete(fn);
}

export function connect() {
  if (source) source.close();
  const t = token.get();
  source = new EventSource("/api/console/events" + (t ? `?access_token=${encodeURIComponent(t)}` : ""));
  source.addEventListener("open", () => listeners.state.forEach((fn) => fn("live")));
  source.addEventListener("error", () => listeners.state.forEach((fn) => fn("reconnecting")));
  for (const kind of ["graph", "mesh"]) {
    source.addEventListener(kind, (e) => {
      const data = JSON.parse(e.data);
      listeners[kind].forEach((fn) => fn(data));
    });
  }
}
