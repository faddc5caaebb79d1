// The plantstream page: live values with last-hour sparklines, closed minutes, active alarms (with
// acknowledge), one series' chart and the alarm journal. Plain JavaScript, no build step.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { token: null, site: null, sites: [], series: new Map(), stream: null, spark: new Map(), alarms: new Map() };
const MAX_ROWS = 300;      // series rows shown per site
const MAX_AGGS = 30;       // closed minutes listed

function fmt(v) {
  if (v === null || v === undefined || v === "") return "";
  if (typeof v !== "number") return String(v);
  const a = Math.abs(v);
  return a !== 0 && (a < 0.01 || a >= 1e6) ? v.toExponential(3) : v.toFixed(a < 10 ? 3 : a < 1000 ? 2 : 1);
}
const time = (t) => (t ? new Date(t).toLocaleTimeString() : "");
const el = (tag, attrs = {}, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k.startsWith("data-")) e.setAttribute(k, v); else e[k] = v;
  }
  for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(k ?? ""));
  return e;
};

async function api(path, opts = {}) {
  const res = await fetch(path, {
    ...opts,
    headers: { Authorization: `Bearer ${state.token}`, "Content-Type": "application/json", ...(opts.headers || {}) },
  });
  const body = res.headers.get("content-type")?.includes("json") ? await res.json() : await res.text();
  if (!res.ok) {
    const err = new Error(body?.detail ? `${body.error}: ${JSON.stringify(body.detail)}` : `HTTP ${res.status}`);
    err.status = res.status;
    throw err;
  }
  return body;
}

// -- login ---------------------------------------------------------------------------------------------
function start() {
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromHash) {
    localStorage.setItem("plantstream.token", fromHash);
    history.replaceState(null, "", location.pathname);  // the token does not stay in the address bar
  }
  state.token = fromHash || localStorage.getItem("plantstream.token");
  if (!state.token) return showLogin("");
  load().catch((e) => showLogin(e.status === 401 ? "That token is not accepted." : e.message));
}

function showLogin(msg) {
  $("#main").hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = msg;
}

$("#login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.token = $("#token").value.trim();
  localStorage.setItem("plantstream.token", state.token);
  $("#login").hidden = true;
  load().catch((e) => showLogin(e.status === 401 ? "That token is not accepted." : e.message));
});

// -- loading -------------------------------------------------------------------------------------------
async function load() {
  state.sites = await api("/api/sites");
  $("#login").hidden = true;
  $("#main").hidden = false;
  const sel = $("#site");
  sel.replaceChildren(...state.sites.map((s) => el("option", { value: s.site }, `${s.site} (${s.series})`)));
  state.site = state.site && state.sites.some((s) => s.site === state.site) ? state.site : state.sites[0]?.site;
  if (state.site) sel.value = state.site;
  await Promise.all([loadSeries(), loadAlarms(), loadJournal()]);
  connect();
}

$("#site").addEventListener("change", async (ev) => {
  state.site = ev.target.value;
  await loadSeries();
  connect();
});

async function loadSeries() {
  const rows = state.site ? await api(`/api/series?site=${encodeURIComponent(state.site)}`) : [];
  state.series = new Map(rows.slice(0, MAX_ROWS).map((r) => [r.series, r]));
  $("#series-count").textContent = `${rows.length} series${rows.length > MAX_ROWS ? `, first ${MAX_ROWS} shown` : ""}`;
  const tbody = $("#series tbody");
  tbody.replaceChildren(...[...state.series.values()].map(seriesRow));
  for (const s of state.series.keys()) loadSpark(s);
}

function seriesRow(r) {
  const short = r.series.split("/").slice(1).join("/");
  const tr = el("tr", { class: "clickable", "data-series": r.series, title: r.series },
    el("td", { class: "name" }, short), el("td", { class: "num value" }), el("td", { class: "unit" }),
    el("td", { class: "quality" }), el("td", { class: "ts" }), el("td", { class: "spark" }));
  tr.addEventListener("click", () => showChart(r.series));
  fillRow(tr, r.latest);
  return tr;
}

function fillRow(tr, latest) {
  if (!latest) return;
  tr.querySelector(".value").textContent = fmt(latest.value);
  tr.querySelector(".unit").textContent = latest.unit ?? "";
  const q = tr.querySelector(".quality");
  q.textContent = latest.quality;
  q.className = `quality quality-${latest.quality}`;
  tr.querySelector(".ts").textContent = time(latest.ts);
  tr.dataset.ts = latest.ts;
}

async function loadSpark(series) {
  const rows = await api(`/api/series/${series}/aggregates?resolution=1m`).catch(() => []);
  state.spark.set(series, rows.map((r) => [Date.parse(r.bucket), r.mean]));
  drawSpark(series);
}

function drawSpark(series) {
  const td = document.querySelector(`tr[data-series="${CSS.escape(series)}"] td.spark`);
  const pts = (state.spark.get(series) || []).filter((p) => p[1] !== null);
  if (!td) return;
  td.replaceChildren();
  if (pts.length < 2) return;
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  const sx = (x) => ((x - x0) / (x1 - x0 || 1)) * 118 + 1, sy = (y) => 21 - ((y - y0) / (y1 - y0 || 1)) * 20;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", "0 0 120 22");
  const line = document.createElementNS(svg.namespaceURI, "polyline");
  line.setAttribute("points", pts.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" "));
  svg.append(line);
  td.append(svg);
}

// -- alarms --------------------------------------------------------------------------------------------
async function loadAlarms() {
  const rows = await api("/api/alarms?state=active");
  state.alarms = new Map(rows.map((a) => [a.instance, a]));
  renderAlarms();
}

// An alarm transition from the stream: newer than what the list holds (by seq), it replaces it there.
function applyAlarm(e) {
  const had = state.alarms.get(e.instance);
  if (had && had.seq >= e.seq) return;
  if (e.active || e.state === "rtn_unack") state.alarms.set(e.instance, { ...had, ...e });
  else state.alarms.delete(e.instance);
  renderAlarms();
}

function renderAlarms() {
  const rows = [...state.alarms.values()].sort((a, b) => (a.ts < b.ts ? 1 : -1));
  $("#alarm-count").textContent = rows.length ? `(${rows.length})` : "(none)";
  $("#alarms tbody").replaceChildren(...rows.map((a) => {
    const ack = el("button", { class: "ack", type: "button" }, "Ack");
    ack.disabled = !(a.state === "unack" || a.state === "rtn_unack");
    ack.addEventListener("click", () => acknowledge(a.instance, ack));
    return el("tr", { "data-instance": a.instance, "data-state": a.state, title: a.message },
      el("td", {}, time(a.ts)), el("td", {}, a.instance), el("td", { class: `sev-${a.severity}` }, a.severity ?? ""),
      el("td", { class: "state" }, a.state), el("td", {}, ack));
  }));
}

async function acknowledge(instance, button) {
  const comment = prompt(`Acknowledge ${instance}\nComment (optional):`, "") ?? null;
  if (comment === null) return;
  button.disabled = true;
  button.textContent = "sent";
  await api(`/api/alarms/${instance}/ack`, { method: "POST", body: JSON.stringify({ comment }) });
}

async function loadJournal() {
  const rows = await api("/api/alarms/events?limit=100");
  $("#journal tbody").replaceChildren(...rows.map(journalRow));
}

function journalRow(e) {
  return el("tr", { "data-id": e.id, "data-transition": e.transition },
    el("td", {}, new Date(e.at || e.ts).toLocaleString()), el("td", {}, e.instance), el("td", {}, e.transition),
    el("td", {}, e.state), el("td", { class: "num" }, fmt(e.value)), el("td", {}, e.by ?? ""), el("td", {}, e.comment ?? ""));
}

// -- the chart -----------------------------------------------------------------------------------------
async function showChart(series) {
  const rows = await api(`/api/series/${series}/aggregates?resolution=1m`);
  $("#detail").hidden = false;
  $("#chart-title").textContent = `${series}: 1-minute mean, min–max, last hour`;
  const svg = $("#chart");
  svg.replaceChildren();
  const pts = rows.filter((r) => r.mean !== null).map((r) => ({ t: Date.parse(r.bucket), ...r }));
  if (pts.length < 2) return;
  const t0 = pts[0].t, t1 = pts[pts.length - 1].t;
  const lo = Math.min(...pts.map((p) => p.min)), hi = Math.max(...pts.map((p) => p.max));
  const sx = (t) => 40 + ((t - t0) / (t1 - t0 || 1)) * 750, sy = (v) => 205 - ((v - lo) / (hi - lo || 1)) * 195;
  const ns = svg.namespaceURI;
  const band = document.createElementNS(ns, "polygon");
  band.setAttribute("class", "band");
  band.setAttribute("points", [...pts.map((p) => `${sx(p.t)},${sy(p.max)}`), ...pts.reverse().map((p) => `${sx(p.t)},${sy(p.min)}`)].join(" "));
  pts.reverse();
  const mean = document.createElementNS(ns, "polyline");
  mean.setAttribute("class", "mean");
  mean.setAttribute("points", pts.map((p) => `${sx(p.t)},${sy(p.mean)}`).join(" "));
  const label = (x, y, s) => { const t = document.createElementNS(ns, "text"); t.setAttribute("x", x); t.setAttribute("y", y); t.textContent = s; return t; };
  svg.append(band, mean, label(2, 12, fmt(hi)), label(2, 208, fmt(lo)), label(40, 219, time(t0)), label(730, 219, time(t1)));
}

// -- the live stream -----------------------------------------------------------------------------------
function connect() {
  if (state.stream) state.stream.close();
  const q = new URLSearchParams({ access_token: state.token });
  if (state.site) q.append("site", state.site);
  const es = new EventSource(`/api/stream?${q}`);
  state.stream = es;
  const status = $("#status");
  es.onopen = () => { status.textContent = "live"; status.className = "status on"; };
  es.onerror = () => { status.textContent = "reconnecting…"; status.className = "status off"; };
  es.addEventListener("latest", (ev) => {
    const r = JSON.parse(ev.data);
    const tr = document.querySelector(`tr[data-series="${CSS.escape(r.series)}"]`);
    if (!tr) return;
    if (Number(tr.dataset.ts || 0) > r.ts) return;
    fillRow(tr, r);
    tr.classList.add("flash");
    setTimeout(() => tr.classList.remove("flash"), 600);
  });
  es.addEventListener("agg", (ev) => {
    const a = JSON.parse(ev.data);
    const tbody = $("#aggs tbody");
    tbody.prepend(el("tr", { "data-series": a.series, "data-window": a.window_start },
      el("td", {}, time(a.window_start)), el("td", {}, a.series.split("/").slice(1).join("/")),
      el("td", { class: "num" }, fmt(a.mean)), el("td", { class: "num" }, fmt(a.min)),
      el("td", { class: "num" }, fmt(a.max)), el("td", { class: "num" }, a.count)));
    while (tbody.children.length > MAX_AGGS) tbody.lastChild.remove();
    const pts = state.spark.get(a.series);
    if (pts && a.mean !== null) { pts.push([a.window_start, a.mean]); drawSpark(a.series); }
  });
  es.addEventListener("alarm", (ev) => {
    const e = JSON.parse(ev.data);
    $("#journal tbody").prepend(journalRow(e));
    applyAlarm(e);
  });
  es.addEventListener("resync", () => { loadSeries(); loadAlarms(); loadJournal(); });
}

start();
