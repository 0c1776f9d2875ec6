// fieldgate's operator page: reads the JSON API (/api/v1/...) every few seconds and draws it.
// Everything shown is built with textContent, never innerHTML: client ids, topics and error
// texts come from devices and must not become markup.
"use strict";

const REFRESH_MS = 2000;
const TABS = ["overview", "devices", "firmware", "configuration"];

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k === "data") for (const [dk, dv] of Object.entries(v)) e.dataset[dk] = dv;
    else e.setAttribute(k, v);
  }
  for (const k of kids.flat()) {
    if (k === null || k === undefined) continue;
    e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  }
  return e;
}

function svg(tag, attrs, ...kids) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  return e;
}

function fill(dl, pairs) {
  dl.replaceChildren(...pairs.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v ?? "–")]));
}

function rows(table, list, cells) {
  const body = table.tBodies[0];
  body.replaceChildren(...list.map((item) => {
    const tr = el("tr", {}, ...cells(item).map((c) => (c instanceof Node && c.tagName === "TD" ? c : el("td", {}, c))));
    tr.dataset.search = JSON.stringify(item).toLowerCase();
    return tr;
  }));
  if (list.length === 0) {
    body.append(el("tr", { class: "empty" }, el("td", { colspan: String(table.tHead.rows[0].cells.length) }, "none")));
  }
}

const num = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));
const rate = (n) => (n === null || n === undefined ? "–" : `${Number(n).toFixed(1)}/s`);

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

function since(ms) {
  if (!ms) return "–";
  return `${new Date(ms).toLocaleString()} (${ago((Date.now() - ms) / 1000)} ago)`;
}

function badge(state) {
  return el("span", { class: "badge", data: { state: state } }, state);
}

async function get(path) {
  const r = await fetch(path, { credentials: "same-origin", cache: "no-store" });
  // With [http.admin] accounts a request without a session (or after it expired) is 401.
  if (r.status === 401) {
    location.href = "/login?next=" + encodeURIComponent(location.pathname + location.hash);
    throw new Error("login needed");
  }
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r.json();
}

// ---- overview --------------------------------------------------------------------------

function drawChart(box, history) {
  const pts = history.points || [];
  // The drawing is as wide as its box, so the labels are not stretched (the box is 180 px
  // high, as the viewBox).
  const W = Math.max(320, Math.round(box.clientWidth || 600)), H = 180, L = 48, R = 48, T = 10, B = 22;
  const s = svg("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img",
    "aria-label": "queue depth and oldest unsent age over the last hour" });
  const span = (history.window_seconds || 3600) * 1000;
  const end = pts.length ? pts[pts.length - 1].t : Date.now();
  const x = (t) => L + ((t - (end - span)) / span) * (W - L - R);
  const maxDepth = Math.max(1, ...pts.map((p) => p.records));
  const maxAge = Math.max(1, ...pts.map((p) => p.oldest_age_seconds));
  const yd = (v) => H - B - (v / maxDepth) * (H - T - B);
  const ya = (v) => H - B - (v / maxAge) * (H - T - B);
  s.append(svg("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }));
  s.append(svg("text", { x: 2, y: T + 10 }, num(maxDepth)));
  s.append(svg("text", { x: 2, y: H - B }, "0"));
  s.append(svg("text", { x: W - R + 4, y: T + 10 }, ago(maxAge)));
  s.append(svg("text", { x: L, y: H - 6 }, "-60 min"));
  s.append(svg("text", { x: W - R - 24, y: H - 6 }, "now"));
  if (pts.length) {
    const line = (y, key) => pts.map((p, i) => `${i ? "L" : "M"}${x(p.t).toFixed(1)},${y(p[key]).toFixed(1)}`).join("");
    s.append(svg("path", { class: "depth", d: line(yd, "records") }, svg("title", {}, "queued records")));
    s.append(svg("path", { class: "age", d: line(ya, "oldest_age_seconds") }, svg("title", {}, "oldest unsent age")));
    for (const p of pts) s.append(svg("circle", { class: "point", cx: x(p.t).toFixed(1), cy: yd(p.records).toFixed(1), r: 1.5 }));
  }
  box.replaceChildren(s, el("div", { class: "muted" },
    `${pts.length} points, every ${history.interval_seconds || 10} s — solid: queued records, dashed: oldest unsent age`));
}

function showStatus(st) {
  document.getElementById("gateway-id").textContent = st.gateway_id;
  const link = document.getElementById("link-state");
  link.dataset.state = st.cloud.state;
  link.textContent = `cloud: ${st.cloud.state}`;
  fill(document.getElementById("cloud"), [
    ["state", badge(st.cloud.state)],
    ["broker", st.cloud.address],
    ["connected since", st.cloud.connected_since_ms ? since(st.cloud.connected_since_ms) : "–"],
    ["reconnects", num(st.cloud.reconnects)],
    ["last error", st.cloud.last_error || "none"],
  ]);
  const q = st.queue;
  fill(document.getElementById("queue"), [
    ["state", badge(q.state)],
    ["records", num(q.records)],
    ["oldest unsent", ago(q.oldest_age_seconds)],
    ["on disk", `${bytes(q.bytes_on_disk)} of ${bytes(q.max_bytes)}`],
    ["max age", ago(q.max_age_seconds)],
  ].concat(q.cause ? [["refusing because", q.cause]] : []));
  fill(document.getElementById("rates"), [
    ["in", rate(st.rates.in_per_second)],
    ["out", rate(st.rates.out_per_second)],
    ["in, total", num(st.messages.in)],
    ["out, total", num(st.messages.out)],
  ]);
  fill(document.getElementById("gateway"), [
    ["id", st.gateway_id],
    ["version", st.version],
    ["uptime", ago(st.uptime_seconds)],
    ["status", badge(st.status)],
  ]);
  drawChart(document.getElementById("chart"), st.history);
  rows(document.getElementById("losses"), st.losses, (l) => [l.what, l.reason, el("td", { class: "num" }, num(l.count))]);
}

// ---- devices and clients ---------------------------------------------------------------

function tagList(tags) {
  return el("td", {}, ...(tags || []).map((t) =>
    el("span", { class: "tag" + (t.quality === "good" ? "" : " bad") },
      `${t.name} = ${t.value === null || t.value === undefined ? "–" : JSON.stringify(t.value)}${t.unit ? " " + t.unit : ""}`,
      el("span", { class: "muted" }, ` ${t.quality}, ${ago(t.age_seconds)} ago`))));
}

function showDevices(d) {
  rows(document.getElementById("device-table"), d.devices, (x) => [
    x.name, x.kind, badge(x.status), x.last_error || "", el("td", { class: "num" }, num(x.overruns)), tagList(x.tags),
  ]);
  applyFilter();
}

function showClients(c) {
  rows(document.getElementById("client-table"), c.clients, (x) => [
    x.client_id || "(empty)", x.identity || "anonymous", x.address, since(x.connected_since_ms),
    el("td", { class: "num" }, num(x.messages_in)), el("td", { class: "num" }, num(x.messages_out)),
    el("td", { class: "num" }, num(x.subscriptions)),
  ]);
  applyFilter();
}

function applyFilter() {
  const f = document.getElementById("filter").value.trim().toLowerCase();
  for (const tr of document.querySelectorAll("#device-table tbody tr, #client-table tbody tr")) {
    tr.hidden = f !== "" && !(tr.dataset.search || "").includes(f);
  }
}

// ---- firmware --------------------------------------------------------------------------

function progress(fraction) {
  const p = Math.max(0, Math.min(1, fraction || 0));
  // Set through the CSSOM: the Content-Security-Policy (default-src 'self') refuses style
  // attributes written as markup.
  const fill = el("span");
  fill.style.width = `${(p * 100).toFixed(1)}%`;
  return el("div", { class: "bar", title: `${Math.round(p * 100)} %` }, fill);
}

function showOta(o) {
  const images = document.getElementById("image-table");
  if (!o.enabled) {
    rows(images, [], () => []);
    document.getElementById("rollouts").replaceChildren(el("p", { class: "muted" }, "OTA is disabled (ota.enabled = false)."));
    return;
  }
  rows(images, o.images, (i) => [
    i.name, i.version, el("td", { class: "num" }, bytes(i.size)), el("code", {}, (i.sha256 || "").slice(0, 16)),
    el("td", {}, badge(i.state), i.state === "fetching" && i.size ? progress(i.fetched / i.size) : null),
    i.last_served_ms ? since(i.last_served_ms) : "never",
  ]);
  const box = document.getElementById("rollouts");
  if (!o.rollouts.length) {
    box.replaceChildren(el("p", { class: "muted" }, "No rollouts."));
    return;
  }
  box.replaceChildren(...o.rollouts.map((r) => {
    const t = el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "device"), el("th", {}, "state"), el("th", {}, "progress"))), el("tbody"));
    t.tBodies[0].append(...r.devices.map((d) => el("tr", {}, el("td", {}, d.device), el("td", {}, badge(d.state)),
      el("td", {}, progress(d.progress), el("span", { class: "muted" }, `${Math.round((d.progress || 0) * 100)} %`)))));
    return el("div", { class: "rollout" }, el("h3", {}, `${r.id}: ${r.image} — ${r.state}`), t);
  }));
}

// ---- configuration ---------------------------------------------------------------------

function showConfig(c) {
  const ul = document.getElementById("problems");
  ul.replaceChildren(...(c.problems.length
    ? c.problems.map((p) => el("li", {}, el("code", {}, p.key), ": ", p.message))
    : [el("li", { class: "none" }, "No problems: check-config would pass.")]));
  document.getElementById("config").textContent = c.toml;
}

// ---- refresh loop ----------------------------------------------------------------------

function tab() {
  const t = location.hash.replace("#", "");
  return TABS.includes(t) ? t : "overview";
}

function showTab() {
  const t = tab();
  for (const name of TABS) document.getElementById(name).hidden = name !== t;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.tab === t);
}

async function refresh() {
  const err = document.getElementById("error");
  try {
    showStatus(await get("/api/v1/status"));
    const t = tab();
    if (t === "devices") {
      const [d, c] = await Promise.all([get("/api/v1/devices"), get("/api/v1/clients")]);
      showDevices(d);
      showClients(c);
    } else if (t === "firmware") {
      showOta(await get("/api/v1/ota"));
    } else if (t === "configuration") {
      showConfig(await get("/api/v1/config"));
    }
    err.hidden = true;
    document.getElementById("refreshed").textContent = `updated ${new Date().toLocaleTimeString()}`;
    document.body.dataset.loaded = "true";
  } catch (e) {
    err.textContent = `Cannot reach the gateway: ${e.message}`;
    err.hidden = false;
  }
}

window.addEventListener("hashchange", () => { showTab(); refresh(); });
document.getElementById("filter").addEventListener("input", applyFilter);
// Who is signed in (with [http.admin]): shown beside a sign-out button.
async function showSession() {
  const s = await get("/api/v1/session");
  if (!s.user) return;
  document.getElementById("user").textContent = `signed in as ${s.user}`;
  document.getElementById("signed-in").hidden = false;
}

showTab();
showSession().catch(() => {});
refresh();
setInterval(refresh, REFRESH_MS);
