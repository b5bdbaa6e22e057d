// The Overview page: requests per second, error rate, time to first byte (p50, p95) per
// channel and the streams in flight, over the last minute. Admin API: GET /api/overview,
// computed from the same numbers GET /metrics serves; polled every 2 s while in view.
// With REDIS_URL the numbers are every gateway instance's, merged (the count of instances
// reporting is shown); while Redis is down, this host's alone, with a notice saying so.

import { $, announce, esc, fmtInt, request, session } from "./core.js";

const API = new URL("../api/overview", location.href);
const POLL_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";

const state = { data: null, seq: 0, loading: false };

const visible = () => !$("overview-view").hidden;

// ------------------------------------------------------------ formatting

const dash = '<span class="muted" title="not enough data yet">—</span>';

function rate(value) {
  if (value == null) return dash;
  if (value === 0) return "0";
  return esc(value < 10 ? value.toFixed(2) : value.toFixed(1));
}

function percent(value) {
  if (value == null) return dash;
  return esc(`${(value * 100).toFixed(value && value < 0.1 ? 1 : 0)}%`);
}

function ms(value) {
  if (value == null) return dash;
  return esc(value >= 1000 ? `${(value / 1000).toFixed(2)} s` : `${Math.round(value)} ms`);
}

// ------------------------------------------------------------ load

export async function show() {
  await load();
}

async function load() {
  if (state.loading) return;
  state.loading = true;
  const seq = ++state.seq;
  let data;
  try {
    data = await request("GET", API);
  } catch (err) {
    if (err.status !== 401 && seq === state.seq) {
      $("overview-error").textContent = `Could not load the overview: ${err.message}`;
      $("overview-error").hidden = false;
    }
    return;
  } finally {
    state.loading = false;
  }
  if (seq !== state.seq) return;
  $("overview-error").hidden = true;
  $("overview-updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  state.data = data;
  render();
}

// ------------------------------------------------------------ render

/** With REDIS_URL: how many instances report (their ids in the tooltip), or the notice
 *  that Redis is down and the numbers are this host's only. */
function scope(data) {
  if (data.notice) return `<span class="badge health-warn" id="overview-notice">${esc(data.notice)}</span> `;
  if (!Array.isArray(data.instances)) return "";
  const count = data.instances.length;
  const ids = data.instances.map((i) =>
    `${i.id}${i.self ? " (this one)" : `, ${i.ageS} s ago`}, ${i.activeStreams} streams`).join("\n");
  return `<span class="badge health-idle" id="overview-instances" title="${esc(ids)}">` +
    `${esc(fmtInt(count))} instance${count === 1 ? "" : "s"} reporting</span> `;
}

function render() {
  const data = state.data;
  const where = data.workers === "instances" ? "every gateway instance sharing Redis"
    : data.workers === "all" ? "all worker processes" : "this gateway process";
  $("overview-facts").innerHTML = scope(data) + (data.window == null
    ? "Measuring: rates appear with the next update (every 2 s)."
    : `Over the last ${esc(Math.round(data.window))} s, from the numbers <code>/metrics</code> serves ` +
      `(${esc(where)}). Errors: 5xx, 429 and streams cut after their start.`);
  renderTotals(data.totals);
  renderChart(data.series || [], data.window);
  renderChannels(data.channels || []);
}

function renderTotals(t) {
  const errors = t.errorRate != null && t.errorRate > 0;
  const unavailable = t.channelsAvailable < t.channels;
  const items = [
    ["Requests/s", rate(t.rps), `${esc(fmtInt(t.requests))} since the gateway started`, ""],
    ["Error rate", percent(t.errorRate), "5xx, 429, broken streams", errors ? " bad" : ""],
    ["TTFB p50", ms(t.ttfbP50Ms), "time to first byte, median", ""],
    ["TTFB p95", ms(t.ttfbP95Ms), "95th percentile", ""],
    ["Active streams", esc(fmtInt(t.activeStreams)), "being relayed now", ""],
    ["Channels available", `${esc(fmtInt(t.channelsAvailable))} of ${esc(fmtInt(t.channels))}`,
      "active channels taking requests now", unavailable ? " warn" : ""],
  ];
  $("overview-totals").innerHTML = items.map(([label, value, sub, cls]) =>
    `<div class="total${cls}"><dt>${esc(label)}</dt>` +
    `<dd><span class="big">${value}</span><span class="sub">${sub}</span></dd></div>`).join("");
}

function el(name, attrs = {}) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

/** Requests per second between successive updates: a line, with the errors as a red one. */
function renderChart(series, window) {
  const box = $("overview-chart");
  const width = Math.max(240, box.clientWidth || 600);
  const height = 96;
  const pad = { top: 8, right: 6, bottom: 16, left: 36 };
  const svg = el("svg", { width, height, viewBox: `0 0 ${width} ${height}`, class: "spark", role: "img" });
  const points = series.filter((p) => Number.isFinite(p.rps));
  const peak = Math.max(1, ...points.map((p) => p.rps));
  const now = points.length ? points[points.length - 1].t : Date.now() / 1000;
  const span = Math.max(window || 60, 10);
  const x = (t) => pad.left + (width - pad.left - pad.right) * (1 - Math.min(1, (now - t) / span));
  const y = (v) => pad.top + (height - pad.top - pad.bottom) * (1 - v / peak);
  const grid = el("g", { class: "grid" });
  for (const v of [0, peak]) {
    grid.append(el("line", { x1: pad.left, x2: width - pad.right, y1: y(v), y2: y(v) }));
    const label = el("text", { x: pad.left - 6, y: y(v) + 4, "text-anchor": "end" });
    label.textContent = v === 0 ? "0" : peak < 10 ? peak.toFixed(1) : Math.round(peak);
    grid.append(label);
  }
  const axis = el("text", { x: width - pad.right, y: height - 3, "text-anchor": "end" });
  axis.textContent = "now";
  const start = el("text", { x: pad.left, y: height - 3 });
  start.textContent = `-${Math.round(span)} s`;
  svg.append(grid, axis, start);
  if (points.length > 1) {
    const line = (key, cls) => el("polyline", {
      class: cls, points: points.map((p) => `${x(p.t).toFixed(1)},${y(key(p)).toFixed(1)}`).join(" "),
    });
    svg.append(line((p) => p.rps, "rps"), line((p) => p.rps * (p.errorRate || 0), "errors"));
  }
  const last = points.length ? points[points.length - 1].rps : null;
  svg.setAttribute("aria-label", points.length > 1
    ? `Requests per second over the last ${Math.round(span)} s: peak ${peak.toFixed(2)}, latest ${last.toFixed(2)}`
    : "Requests per second: not enough updates yet");
  box.replaceChildren(svg);
}

function stateBadge(c) {
  if (c.status === "removed") return '<span class="badge health-idle">removed</span>';
  if (c.status !== "active") return `<span class="badge status-${esc(c.status)}">${esc(c.status)}</span>`;
  if (c.available === false) return '<span class="badge health-bad">unavailable</span>';
  return '<span class="badge health-ok">available</span>';
}

function renderChannels(channels) {
  const rows = channels.map((c) => {
    const errors = c.errorRate != null && c.errorRate > 0;
    return `<tr data-name="${esc(c.name)}"><th scope="row"><span class="name">${esc(c.name)}</span></th>` +
      `<td data-label="State">${stateBadge(c)}</td>` +
      `<td class="num" data-label="Requests/s">${rate(c.rps)}</td>` +
      `<td class="num${errors ? " error-text" : ""}" data-label="Error rate">${percent(c.errorRate)}</td>` +
      `<td class="num" data-label="TTFB p50">${ms(c.ttfbP50Ms)}</td>` +
      `<td class="num" data-label="TTFB p95">${ms(c.ttfbP95Ms)}</td>` +
      `<td class="num" data-label="Output tokens/s">${rate(c.outputTokensPerS)}</td>` +
      `<td class="num" data-label="Requests">${esc(fmtInt(c.requests))}</td></tr>`;
  });
  $("overview-rows").innerHTML = rows.length ? rows.join("")
    : '<tr><td colspan="8" class="empty">No channels configured.</td></tr>';
}

// ------------------------------------------------------------ init

export function init() {
  $("overview-refresh").addEventListener("click", async () => {
    await load();
    announce("Overview updated.");
  });
  let width = 0;
  new ResizeObserver(() => {
    const now = $("overview-chart").clientWidth;
    if (state.data && visible() && Math.abs(now - width) > 8) {
      width = now;
      renderChart(state.data.series || [], state.data.window);
    }
  }).observe($("overview-chart"));
  setInterval(() => {
    if (session.key && visible() && !document.hidden && $("overview-auto").checked) load();
  }, POLL_MS);
}
