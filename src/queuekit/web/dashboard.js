// queuekit dashboard: reads /api/* every few seconds and draws it. No framework, no external
// assets. Everything the server sends is set as text (textContent) or SVG attributes, never as
// markup. Tokens stay in this tab's sessionStorage and travel only in request headers.
"use strict";

const REFRESH_MS = 3000;
const SVG = "http://www.w3.org/2000/svg";
const COLORS = {
  ready: "#2f6fdf", inflight: "#e08a1e", delayed: "#8a5cc7", dead: "#d33c3c",
  put: "#2f6fdf", ack: "#2e9d5b", fail: "#d33c3c",
};
const QUEUE_COLUMNS = ["ready", "inflight", "delayed", "dead", "waiting", "enqueued", "acked", "nacked",
  "redelivered", "dead_lettered"];

const state = { deadQueue: null, actions: false, timer: null };

function $(id) { return document.getElementById(id); }

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function headers(extra) {
  const h = Object.assign({ "Accept": "application/json" }, extra || {});
  const token = sessionStorage.getItem("queuekit.read") || "";
  if (token) h["Authorization"] = "Bearer " + token;
  return h;
}

async function api(path, options) {
  const response = await fetch(path, Object.assign({ headers: headers(), cache: "no-store" }, options || {}));
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const why = body && body.error ? body.error : response.statusText;
    throw new Error(response.status + " " + why);
  }
  return body;
}

function say(text, isError) {
  const m = $("message");
  m.textContent = text;
  m.className = isError ? "error" : "ok";
  m.hidden = !text;
}

function replaceRows(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function cell(text, attrs) {
  const td = el("td", text);
  for (const [k, v] of Object.entries(attrs || {})) td.dataset[k] = v;
  return td;
}

function ago(seconds) {
  if (seconds < 90) return Math.round(seconds) + " s";
  if (seconds < 5400) return Math.round(seconds / 60) + " min";
  return (seconds / 3600).toFixed(1) + " h";
}

// -- overview ---------------------------------------------------------------------------------

function drawOverview(o) {
  const s = o.stats;
  state.actions = o.actions;
  $("version").textContent = o.version;
  // A standby (several servers on one PostgreSQL journal) is never ready, by design: not an alarm.
  // Without a journal session (the database unreachable) it cannot take over: that is one.
  const standby = s.role === "standby";
  const detached = s.leadership !== undefined && s.leadership.journal_connected === false;
  $("server-status").textContent =
    (s.ready ? "ready" : standby ? "standby (not the leader)" : "NOT READY") +
    (detached ? " · no journal session" : "") + " · " +
    s.connections + " connections · " +
    (s.durable ? "durable" : "memory only") + " · up " + ago(s.uptime_seconds);
  $("server-status").className = "status" + (s.ready ? " good" : standby && !detached ? "" : " bad");
  $("omitted").textContent = s.omitted ? "(" + s.omitted + " more not shown)" : "";
  const names = Object.keys(s.queues).sort();
  replaceRows($("queues").tBodies[0], names.map((name) => {
    const q = s.queues[name];
    const tr = el("tr");
    tr.dataset.queue = name;
    tr.append(cell(name, { field: "name" }));
    for (const col of QUEUE_COLUMNS) {
      const td = cell(q[col], { field: col });
      if (col === "dead" && q.dead > 0) td.className = "bad";
      tr.append(td);
    }
    return tr;
  }));
  drawClients(o.clients);
  drawConsumers(o.consumers || []);
  drawDeadSelect(names, s.queues);
  $("actions-note").textContent = o.actions ? "" :
    "read-only: the server has no dashboard admin token (QUEUEKIT_DASHBOARD_ADMIN_TOKEN_FILE)";
  for (const b of document.querySelectorAll("#dead button.action, .toolbar > button.action")) {
    if (b.id !== "task-cancel") b.disabled = !o.actions;
  }
}

function drawClients(clients) {
  $("client-count").textContent = "(" + clients.length + ")";
  replaceRows($("clients").tBodies[0], clients.map((c) => {
    const tr = el("tr");
    tr.append(cell(c.name), cell(c.peer), cell(c.key + " (" + c.role + ")"), cell(c.state),
      cell(c.waiting_on || ""), cell(c.tls ? "yes" : "no"));
    return tr;
  }));
}

// What each consumer said of itself on its last heartbeat; all text, set as text.
function drawConsumers(consumers) {
  $("consumer-count").textContent = "(" + consumers.length + ")";
  replaceRows($("consumers").tBodies[0], consumers.map((c) => {
    const tr = el("tr");
    tr.append(cell(c.host, { field: "host" }), cell(String(c.pid), { field: "pid" }),
      cell(c.queues.join(", "), { field: "queues" }),
      cell(c.concurrency + " (" + c.pool + ")", { field: "concurrency" }),
      cell(String(c.in_flight), { field: "in_flight" }), cell(ago(c.last_heartbeat_age) + " ago"),
      cell(c.version, { field: "version" }), cell(c.session));
    return tr;
  }));
}

function drawDeadSelect(names, queues) {
  const select = $("dead-queue");
  const withDead = names.filter((n) => queues[n].dead > 0);
  const choices = withDead.length ? withDead : names;
  if (!state.deadQueue || !choices.includes(state.deadQueue)) state.deadQueue = choices[0] || null;
  const label = (n) => n + (queues[n].dead ? " (" + queues[n].dead + " dead)" : "");
  const current = Array.from(select.options).map((o) => o.textContent).join("\n");
  if (current !== choices.map(label).join("\n")) {  // rebuilt only on change: an open list stays open
    select.replaceChildren(...choices.map((n) => {
      const opt = el("option", label(n));
      opt.value = n;
      return opt;
    }));
  }
  if (state.deadQueue) select.value = state.deadQueue;
}

// -- dead letters -----------------------------------------------------------------------------

async function refreshDead() {
  const tbody = $("dead").tBodies[0];
  if (!state.deadQueue) { replaceRows(tbody, []); return; }
  const admin = sessionStorage.getItem("queuekit.admin") || "";
  const d = await api("/api/dead?queue=" + encodeURIComponent(state.deadQueue) + "&limit=50",
    { headers: headers(admin ? { "X-Queuekit-Admin": admin } : {}) });
  $("dead-note").textContent = d.contents ? "" :
    "payloads and errors hidden: the HTTP port has no read token (QUEUEKIT_HTTP_TOKEN_FILE); enter the admin token to see them";
  replaceRows(tbody, d.items.map((item) => {
    const tr = el("tr");
    tr.dataset.task = String(item.id);
    const when = item.enqueued_at ? new Date(item.enqueued_at * 1000).toLocaleString() : "";
    const payload = el("td");
    if (item.payload === null) {
      payload.append(el("span", "hidden (" + item.payload_chars + " chars)", "note"));
    } else {
      const more = item.payload_chars > item.payload.length ? " … (" + item.payload_chars + " chars)" : "";
      payload.append(el("code", item.payload + more));
    }
    const buttons = el("td");
    const requeue = el("button", "requeue", "action");
    requeue.type = "button";
    requeue.dataset.act = "requeue";
    requeue.disabled = !state.actions;
    requeue.addEventListener("click", () => act("requeue", [item.id]));
    const purge = el("button", "purge", "action danger");
    purge.type = "button";
    purge.dataset.act = "purge";
    purge.disabled = !state.actions;
    purge.addEventListener("click", () => act("purge", [item.id]));
    buttons.append(requeue, purge);
    tr.append(cell(item.id), cell(item.attempts), cell(when), cell(item.error === null ? "hidden" : item.error, { field: "error" }), payload, buttons);
    return tr;
  }));
}

async function act(action, ids) {
  if (!state.deadQueue) return;
  const admin = sessionStorage.getItem("queuekit.admin") || "";
  if (!admin) { say("enter the admin token first", true); return; }
  if (action === "purge" && !ids && !window.confirm("Drop every dead letter of " + state.deadQueue + "?")) return;
  const body = { queue: state.deadQueue, ids: ids || null };
  if (action === "purge" && !ids) body.all = true;
  try {
    const r = await api("/api/dead/" + action, {
      method: "POST",
      headers: headers({ "Content-Type": "application/json", "X-Queuekit-Admin": admin }),
      body: JSON.stringify(body),
    });
    say(r.action + ": " + r.count + " task(s) of " + r.queue, false);
  } catch (e) {
    say(action + " failed: " + e.message, true);
  }
  refresh();
}

// -- one task: look up, cancel ----------------------------------------------------------------

const FINISHED = ["succeeded", "dead", "cancelled", "unknown"];

function taskQuery() {
  const id = $("task-id").value.trim();
  const queue = $("task-queue").value.trim();
  if (!/^[0-9]+$/.test(id)) throw new Error("a task id is a number");
  return { id: id, queue: queue || null };
}

async function lookUp() {
  let q;
  try { q = taskQuery(); } catch (e) { say(e.message, true); return; }
  const admin = sessionStorage.getItem("queuekit.admin") || "";
  try {
    const r = await api("/api/task?id=" + q.id + (q.queue ? "&queue=" + encodeURIComponent(q.queue) : ""),
      { headers: headers(admin ? { "X-Queuekit-Admin": admin } : {}) });
    const t = r.task;
    const when = (s) => (s ? new Date(s * 1000).toLocaleString() : "");
    const rows = [["id", t.id], ["queue", t.queue || ""], ["state", t.state], ["attempts", t.attempts],
      ["last error", t.last_error === null ? (r.contents ? "" : "hidden") : t.last_error],
      ["enqueued", when(t.enqueued_at)], ["started", when(t.started_at)], ["finished", when(t.finished_at)],
      ["consumer", t.consumer || ""], ["result stored", t.has_result ? "yes" : "no"]];
    replaceRows($("task").tBodies[0], rows.map(([k, v]) => {
      const tr = el("tr");
      tr.dataset.field = k;
      tr.append(el("th", k), cell(v));
      return tr;
    }));
    $("task-cancel").disabled = !state.actions || FINISHED.includes(t.state);
  } catch (e) {
    say("look up failed: " + e.message, true);
  }
}

async function cancelTask() {
  let q;
  try { q = taskQuery(); } catch (e) { say(e.message, true); return; }
  const admin = sessionStorage.getItem("queuekit.admin") || "";
  if (!admin) { say("enter the admin token first", true); return; }
  try {
    const r = await api("/api/task/cancel", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json", "X-Queuekit-Admin": admin }),
      // The id as JSON text digits: task ids fit a double exactly (microsecond timestamps < 2^53).
      body: JSON.stringify({ id: Number(q.id), queue: q.queue }),
    });
    say("cancel: task " + r.id + " is " + r.state, false);
  } catch (e) {
    say("cancel failed: " + e.message, true);
  }
  lookUp();
}

// -- charts -----------------------------------------------------------------------------------

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

function chart(title, t, seriesByName) {
  const W = 420, H = 130, L = 44, R = 8, T = 8, B = 20;
  const box = el("figure", null, "chart");
  const s = svg("svg", { viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": title });
  let max = 0;
  for (const values of Object.values(seriesByName)) for (const v of values) if (v !== null && v > max) max = v;
  const top = max > 0 ? niceCeil(max) : 1;
  const t0 = t.length ? t[0] : 0, t1 = t.length ? t[t.length - 1] : 1;
  const x = (ts) => L + (t1 > t0 ? (ts - t0) / (t1 - t0) : 1) * (W - L - R);
  const y = (v) => T + (1 - v / top) * (H - T - B);
  for (const frac of [0, 0.5, 1]) {
    s.append(svg("line", { x1: L, x2: W - R, y1: y(top * frac), y2: y(top * frac), class: "grid" }));
    const label = svg("text", { x: L - 4, y: y(top * frac) + 4, "text-anchor": "end", class: "axis" });
    label.textContent = formatNumber(top * frac);
    s.append(label);
  }
  const span = svg("text", { x: W - R, y: H - 4, "text-anchor": "end", class: "axis" });
  span.textContent = t.length > 1 ? "last " + ago(t1 - t0) : "collecting…";
  s.append(span);
  for (const [name, values] of Object.entries(seriesByName)) {
    let d = "", pen = false;
    values.forEach((v, i) => {
      if (v === null) { pen = false; return; }
      d += (pen ? "L" : "M") + x(t[i]).toFixed(1) + " " + y(v).toFixed(1) + " ";
      pen = true;
    });
    if (d) s.append(svg("path", { d: d, fill: "none", stroke: COLORS[name], "stroke-width": 1.8, class: "series" }));
  }
  const caption = el("figcaption", title);
  const legend = el("span", null, "legend");
  for (const name of Object.keys(seriesByName)) {
    const key = el("span", name, "key");
    const swatch = el("i");
    swatch.style.background = COLORS[name];  // CSSOM, allowed by the CSP (no inline style markup)
    key.prepend(swatch);
    legend.append(key);
  }
  caption.append(legend);
  box.append(s, caption);
  return box;
}

function niceCeil(v) {
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function formatNumber(v) {
  if (v >= 1e6) return (v / 1e6).toFixed(1) + "M";
  if (v >= 1e4) return (v / 1e3).toFixed(0) + "k";
  if (v >= 100 || Number.isInteger(v)) return String(Math.round(v));
  return v.toFixed(1);
}

async function refreshHistory() {
  const h = await api("/api/history");
  $("history-note").textContent = "(a sample every " + h.interval + " s, " + h.points + " kept" +
    (h.omitted ? "; " + h.omitted + " queues without history" : "") + ")";
  const cards = Object.entries(h.queues).map(([name, series]) => {
    const card = el("div", null, "card");
    card.dataset.queue = name;
    card.append(el("h3", name),
      chart("depth", h.t, { ready: series.ready, inflight: series.inflight, delayed: series.delayed, dead: series.dead }),
      chart("rates per second", h.t, { put: series.put, ack: series.ack, fail: series.fail }));
    return card;
  });
  $("charts").replaceChildren(...cards);
}

// -- the loop ---------------------------------------------------------------------------------

async function refresh() {
  clearTimeout(state.timer);
  try {
    drawOverview(await api("/api/overview"));
    await Promise.all([refreshHistory(), refreshDead()]);
    $("refreshed").textContent = new Date().toLocaleTimeString();
    document.body.dataset.loaded = String(Date.now());
  } catch (e) {
    $("server-status").textContent = "error: " + e.message;
    $("server-status").className = "status bad";
  }
  state.timer = setTimeout(refresh, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("read-token").value = sessionStorage.getItem("queuekit.read") || "";
  $("admin-token").value = sessionStorage.getItem("queuekit.admin") || "";
  $("credentials").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem("queuekit.read", $("read-token").value.trim());
    sessionStorage.setItem("queuekit.admin", $("admin-token").value.trim());
    say("", false);
    refresh();
  });
  $("dead-queue").addEventListener("change", (event) => { state.deadQueue = event.target.value; refresh(); });
  $("dead-requeue-all").addEventListener("click", () => act("requeue", null));
  $("dead-purge-all").addEventListener("click", () => act("purge", null));
  $("task-form").addEventListener("submit", (event) => { event.preventDefault(); lookUp(); });
  $("task-cancel").addEventListener("click", cancelTask);
  refresh();
});
