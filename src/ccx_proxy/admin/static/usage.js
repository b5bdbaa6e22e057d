// The Usage page: totals, a per-day stacked bar chart (inline SVG drawn here), the grouped
// rows, and the same query as CSV. Admin API: GET /api/usage and /api/usage.csv.

import {
  $, TEAM_API, announce, esc, fmtCompact, fmtInt, fmtUsd, request, session, teamApi, tokensOf,
} from "./core.js";

const SVG = "http://www.w3.org/2000/svg";
const MAX_SERIES = 8; // more than this many members/models: the smallest are drawn as "Other"
const OTHER = "Other";
// Distinguishable colours (Okabe-Ito-like, darkened for contrast on white), then grey for "Other".
const COLOURS = ["#2150c8", "#d55e00", "#0f7b5f", "#b8860b", "#8e44ad", "#0072b2", "#c2185b", "#5a6b2f"];
const OTHER_COLOUR = "#8b93a1";
const COLUMN_LABELS = {
  requests: "Requests", errors: "Errors", input_tokens: "Input", output_tokens: "Output",
  cache_write_5m: "Cache write 5m", cache_write_1h: "Cache write 1h", cache_read: "Cache read", cost_usd: "Cost",
};

const state = {
  data: null, // the last /api/usage answer (grouped by day and the stack key)
  query: "", // its query string
  stack: "member",
  measure: "tokens",
  seq: 0,
  names: { members: new Set(), models: new Set() },
};

const visible = () => !$("usage-view").hidden;

function setStatus(text, isError = false) {
  const line = $("usage-status");
  line.textContent = text;
  line.classList.toggle("error-text", isError);
}

// ------------------------------------------------------------ query

/** The query string of the filters, or an error message. */
function buildQuery() {
  const params = new URLSearchParams();
  const range = $("u-range").value;
  if (range === "custom") {
    const from = $("u-from").value;
    const to = $("u-to").value;
    if (!from || !to) return { error: "Choose both dates, or a preset range." };
    if (from > to) return { error: `The start (${from}) is after the end (${to}).` };
    params.set("from", from);
    params.set("to", to);
  } else {
    params.set("since", range);
  }
  state.stack = document.querySelector('input[name="u-stack"]:checked').value;
  state.measure = document.querySelector('input[name="u-measure"]:checked').value;
  params.set("groupBy", `day,${state.stack}`);
  for (const name of ["member", "model", "channel"]) {
    const value = $(`u-${name}`).value.trim();
    if (value) params.set(name, value);
  }
  return { query: params.toString() };
}

export async function show() {
  await load();
}

async function load(quiet = false) {
  const { query, error } = buildQuery();
  const problem = $("u-error");
  problem.textContent = error || "";
  problem.hidden = !error;
  if (error) return;
  $("usage-csv").href = new URL(`usage.csv?${query}`, TEAM_API).href;
  const seq = ++state.seq;
  let data;
  try {
    data = await teamApi("GET", `usage?${query}`);
  } catch (err) {
    if (err.status === 401 || seq !== state.seq) return;
    $("usage-error").textContent = `Could not load the usage: ${err.message}`;
    $("usage-error").hidden = false;
    return;
  }
  if (seq !== state.seq) return; // a newer query was asked for meanwhile
  $("usage-error").hidden = true;
  $("usage-updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  if (quiet && query === state.query && JSON.stringify(data) === JSON.stringify(state.data)) return;
  state.data = data;
  state.query = query;
  remember(data.rows);
  render();
  loadChannelsOnce();
}

/** Names seen, offered as suggestions in the filters. */
function remember(rows) {
  const known = state.names;
  const before = known.members.size + known.models.size;
  for (const row of rows) {
    if (row.member) known.members.add(row.member);
    if (row.model) known.models.add(row.model);
  }
  if (known.members.size + known.models.size === before && $("u-members").children.length) return;
  const options = (set) => [...set].sort().map((v) => Object.assign(document.createElement("option"), { value: v }));
  $("u-members").replaceChildren(...options(known.members));
  $("u-models").replaceChildren(...options(known.models));
}

let channelsLoaded = false;
async function loadChannelsOnce() {
  if (channelsLoaded) return;
  channelsLoaded = true;
  try {
    const [channels, members] = await Promise.all([
      request("GET", new URL("../api/messages/channels", location.href)),
      teamApi("GET", "members"),
    ]);
    const select = $("u-channel");
    const current = select.value;
    select.replaceChildren(new Option("All channels", ""), ...(channels.channels || []).map((c) => new Option(c.name, c.name)));
    select.value = current;
    for (const m of members.members || []) state.names.members.add(m.name);
    remember([]);
  } catch {
    channelsLoaded = false;
  }
}

// ------------------------------------------------------------ render

function render() {
  const data = state.data;
  const stackLabel = state.stack === "member" ? "member" : "model";
  $("usage-range").innerHTML = `${esc(data.from)} to ${esc(data.to)} (UTC days)` +
    `${data.rows.length ? "" : ": <strong>no requests in this range</strong>"}.`;
  renderTotals(data.totals || {});
  renderChart();
  $("usage-group-title").textContent = `By ${stackLabel}`;
  renderGroupTable(stackLabel);
}

function renderTotals(t) {
  const tokens = tokensOf(t);
  const items = [
    ["Requests", fmtInt(t.requests), t.errors ? `${fmtInt(t.errors)} error${t.errors === 1 ? "" : "s"}` : "no errors"],
    ["Tokens", fmtInt(tokens), "all kinds"],
    ["Input", fmtInt(t.input_tokens), "tokens"],
    ["Output", fmtInt(t.output_tokens), "tokens"],
    ["Cache writes", fmtInt((t.cache_write_5m || 0) + (t.cache_write_1h || 0)),
      `5m ${fmtInt(t.cache_write_5m)} · 1h ${fmtInt(t.cache_write_1h)}`],
    ["Cache reads", fmtInt(t.cache_read), "tokens"],
    ["Cost", fmtUsd(t.cost_usd), t.unpriced ? `${fmtInt(t.unpriced)} request${t.unpriced === 1 ? "" : "s"} unpriced`
      : "every request priced"],
  ];
  $("usage-totals").innerHTML = items.map(([label, value, sub], i) =>
    `<div class="total${i === items.length - 1 && t.unpriced ? " has-unpriced" : ""}"><dt>${esc(label)}</dt>` +
    `<dd><span class="big">${esc(value)}</span><span class="sub">${esc(sub)}</span></dd></div>`).join("");
}

/** Every UTC day from `from` to `to`, both included. */
function daysBetween(from, to) {
  const days = [];
  const end = Date.parse(`${to}T00:00:00Z`);
  for (let t = Date.parse(`${from}T00:00:00Z`); t <= end && days.length < 4000; t += 86400000) {
    days.push(new Date(t).toISOString().slice(0, 10));
  }
  return days;
}

/** Series (biggest first, the rest folded into "Other") and per-day values. */
function chartData() {
  const data = state.data;
  const value = state.measure === "usd" ? (r) => r.cost_usd || 0 : tokensOf;
  const key = (r) => r[state.stack] ?? "(none)";
  const totals = new Map();
  for (const row of data.rows) totals.set(key(row), (totals.get(key(row)) || 0) + value(row));
  let names = [...totals.keys()].sort((a, b) => totals.get(b) - totals.get(a) || (a < b ? -1 : 1));
  const folded = new Set();
  if (names.length > MAX_SERIES) {
    names.slice(MAX_SERIES - 1).forEach((n) => folded.add(n));
    names = [...names.slice(0, MAX_SERIES - 1), OTHER];
  }
  const series = names.map((name, i) => ({
    name,
    colour: name === OTHER && folded.size ? OTHER_COLOUR : COLOURS[i % COLOURS.length],
    total: name === OTHER && folded.size ? [...folded].reduce((s, n) => s + totals.get(n), 0) : totals.get(name),
  }));
  const days = daysBetween(data.from, data.to);
  const byDay = new Map(days.map((d) => [d, new Map()]));
  for (const row of data.rows) {
    const cell = byDay.get(row.day);
    if (!cell) continue;
    const name = folded.has(key(row)) ? OTHER : key(row);
    cell.set(name, (cell.get(name) || 0) + value(row));
  }
  return { days, series, byDay };
}

/** About five round steps from 0 past `max`. */
function ticks(max) {
  if (!(max > 0)) return [0, 1];
  const raw = max / 4;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * power).find((s) => s >= raw);
  const out = [];
  for (let v = 0; v < max + step * 0.999; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

function el(name, attrs = {}, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function renderChart() {
  const { days, series, byDay } = chartData();
  const usd = state.measure === "usd";
  const fmtValue = usd ? fmtUsd : (v) => `${fmtInt(v)} tokens`;
  const fmtAxis = usd ? (v) => (v < 1 && v > 0 ? `$${Number(v.toPrecision(2))}` : `$${fmtCompact(v)}`) : fmtCompact;
  const stackLabel = state.stack === "member" ? "member" : "model";
  const what = usd ? "Cost in USD" : "Tokens";
  $("usage-chart-caption").textContent = `${what} per day, stacked by ${stackLabel}`;

  const box = $("usage-chart");
  const width = Math.max(280, Math.round(box.clientWidth || 720));
  const height = width < 500 ? 220 : 260;
  const sums = days.map((d) => [...byDay.get(d).values()].reduce((a, b) => a + b, 0));
  const steps = ticks(Math.max(0, ...sums));
  const top = steps[steps.length - 1] || 1;
  const labelWidth = Math.max(...steps.map((v) => fmtAxis(v).length)) * 7 + 10;
  const m = { left: labelWidth, right: 8, top: 10, bottom: 24 };
  const plotW = width - m.left - m.right;
  const plotH = height - m.top - m.bottom;
  const slot = plotW / days.length;
  const barW = Math.max(1, Math.min(48, slot * 0.72));
  const y = (v) => m.top + plotH - (v / top) * plotH;

  const total = sums.reduce((a, b) => a + b, 0);
  const busiest = sums.indexOf(Math.max(...sums));
  const svg = el("svg", {
    viewBox: `0 0 ${width} ${height}`, width: "100%", height, role: "img",
    "aria-labelledby": "usage-svg-title usage-svg-desc", class: "bars",
  });
  svg.append(
    el("title", { id: "usage-svg-title" }, `${what} per day from ${state.data.from} to ${state.data.to}, ` +
      `stacked by ${stackLabel}`),
    el("desc", { id: "usage-svg-desc" }, total
      ? `Total ${fmtValue(total)} over ${days.length} day${days.length === 1 ? "" : "s"}; the busiest day is ` +
        `${days[busiest]} with ${fmtValue(sums[busiest])}. Series: ` +
        `${series.map((s) => `${s.name} ${fmtValue(s.total)}`).join(", ")}. The numbers are in the table ` +
        "under the chart."
      : "No usage in this range."),
  );
  const grid = el("g", { class: "grid", "aria-hidden": "true" });
  for (const v of steps) {
    grid.append(el("line", { x1: m.left, x2: width - m.right, y1: y(v), y2: y(v) }));
    grid.append(el("text", { x: m.left - 6, y: y(v) + 4, "text-anchor": "end" }, fmtAxis(v)));
  }
  svg.append(grid);

  const bars = el("g", { class: "series" });
  days.forEach((day, i) => {
    const cell = byDay.get(day);
    let base = 0;
    const x = m.left + i * slot + (slot - barW) / 2;
    for (const s of series) {
      const v = cell.get(s.name) || 0;
      if (!v) continue;
      const y0 = y(base);
      const y1 = y(base + v);
      const rect = el("rect", {
        x: x.toFixed(2), y: y1.toFixed(2), width: barW.toFixed(2), height: Math.max(0.5, y0 - y1).toFixed(2),
        fill: s.colour, "data-day": day, "data-series": s.name,
      });
      rect.append(el("title", {}, `${day} · ${s.name}: ${fmtValue(v)}`));
      bars.append(rect);
      base += v;
    }
  });
  svg.append(bars);

  const axis = el("g", { class: "axis", "aria-hidden": "true" });
  axis.append(el("line", { x1: m.left, x2: width - m.right, y1: y(0), y2: y(0) }));
  const every = Math.max(1, Math.ceil(days.length / Math.max(1, Math.floor(plotW / 46))));
  days.forEach((day, i) => {
    if (i % every && i !== days.length - 1) return;
    if (i === days.length - 1 && i % every && (days.length - 1) % every < every * 0.6) return;
    axis.append(el("text", { x: m.left + (i + 0.5) * slot, y: height - 6, "text-anchor": "middle" }, day.slice(5)));
  });
  svg.append(axis);
  box.replaceChildren(svg);

  $("usage-legend").innerHTML = series.length
    ? series.map((s) => `<li><span class="swatch" style="background:${s.colour}" aria-hidden="true"></span>` +
      `<span class="legend-name">${esc(s.name)}</span> <span class="muted">${esc(fmtValue(s.total))}</span></li>`).join("")
    : `<li class="muted">No usage in this range.</li>`;

  // The same numbers as a table, for screen readers and anyone who wants the figures.
  const head = `<tr><th scope="col">Day</th>${series.map((s) => `<th scope="col">${esc(s.name)}</th>`).join("")}` +
    `<th scope="col">Total</th></tr>`;
  const body = days.map((day, i) => `<tr><th scope="row">${esc(day)}</th>` +
    `${series.map((s) => `<td class="num" data-label="${esc(s.name)}">` +
      `${esc(fmtValue(byDay.get(day).get(s.name) || 0))}</td>`).join("")}` +
    `<td class="num" data-label="Total">${esc(fmtValue(sums[i]))}</td></tr>`).join("");
  $("usage-chart-table").innerHTML = `<table class="data chart-data cards"><caption class="sr-only">${esc(what)} per day ` +
    `by ${esc(stackLabel)}</caption><thead>${head}</thead><tbody>${body}</tbody></table>`;
}

function groupRows() {
  const key = state.stack;
  const out = new Map();
  for (const row of state.data.rows) {
    const name = row[key] ?? "(none)";
    const sum = out.get(name) || { name, requests: 0, errors: 0, input_tokens: 0, output_tokens: 0,
      cache_write_5m: 0, cache_write_1h: 0, cache_read: 0, cost_usd: 0, unpriced: 0 };
    for (const c of Object.keys(sum)) if (c !== "name") sum[c] += row[c] || 0;
    out.set(name, sum);
  }
  return [...out.values()].sort((a, b) => tokensOf(b) - tokensOf(a) || (a.name < b.name ? -1 : 1));
}

function cells(row) {
  return Object.keys(COLUMN_LABELS).map((c) => {
    const value = c === "cost_usd" ? fmtUsd(row[c]) : fmtInt(row[c]);
    const note = c === "cost_usd" && row.unpriced ? `<span class="sub warn-text">${fmtInt(row.unpriced)} unpriced</span>` : "";
    return `<td class="num" data-label="${esc(COLUMN_LABELS[c])}">${esc(value)}${note}</td>`;
  }).join("");
}

function renderGroupTable(stackLabel) {
  const label = stackLabel[0].toUpperCase() + stackLabel.slice(1);
  $("usage-head").innerHTML = `<tr><th scope="col">${esc(label)}</th>` +
    `${Object.values(COLUMN_LABELS).map((l) => `<th scope="col" class="num">${esc(l)}</th>`).join("")}</tr>`;
  const rows = groupRows();
  $("usage-rows").innerHTML = rows.length
    ? rows.map((r) => `<tr><th scope="row"><span class="name">${esc(r.name)}</span></th>${cells(r)}</tr>`).join("")
    : `<tr><td colspan="9" class="empty">No requests in this range.</td></tr>`;
  $("usage-foot").innerHTML = rows.length > 1
    ? `<tr><th scope="row">Total</th>${cells(state.data.totals)}</tr>` : "";
}

// ------------------------------------------------------------ CSV

/** The CSV needs the admin key header, so it is fetched here and handed over as a Blob URL. */
async function downloadCsv(event) {
  event.preventDefault();
  const { query, error } = buildQuery();
  if (error) {
    $("u-error").textContent = error;
    $("u-error").hidden = false;
    return;
  }
  let res;
  try {
    res = await request("GET", new URL(`usage.csv?${query}`, TEAM_API), { raw: true });
  } catch (err) {
    if (err.status !== 401) setStatus(`Download failed: ${err.message}`, true);
    return;
  }
  const blob = await res.blob();
  const disposition = res.headers.get("content-disposition") || "";
  const named = /filename="?([^";]+)"?/i.exec(disposition);
  const params = new URLSearchParams(query);
  const name = named ? named[1] : `ccx-usage-${params.get("from") || params.get("since")}` +
    `${params.get("to") ? `-${params.get("to")}` : ""}.csv`;
  const url = URL.createObjectURL(blob);
  const link = Object.assign(document.createElement("a"), { href: url, download: name, hidden: true });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
  setStatus(`Downloaded ${name}.`);
  announce(`Downloaded ${name}.`);
}

// ------------------------------------------------------------ wiring

function todayUtc(offsetDays = 0) {
  return new Date(Date.now() + offsetDays * 86400000).toISOString().slice(0, 10);
}

export function init() {
  const form = $("usage-filters");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    load();
  });
  $("u-range").addEventListener("change", () => {
    const custom = $("u-range").value === "custom";
    $("u-dates").hidden = !custom;
    if (custom && !$("u-from").value) {
      $("u-from").value = todayUtc(-6);
      $("u-to").value = todayUtc();
    }
    load();
  });
  for (const id of ["u-from", "u-to", "u-channel"]) $(id).addEventListener("change", () => load());
  for (const id of ["u-member", "u-model"]) {
    $(id).addEventListener("change", () => load());
  }
  for (const radio of form.querySelectorAll('input[name="u-stack"]')) radio.addEventListener("change", () => load());
  for (const radio of form.querySelectorAll('input[name="u-measure"]')) {
    radio.addEventListener("change", () => {
      state.measure = radio.value;
      if (state.data) renderChart();
    });
  }
  $("usage-refresh").addEventListener("click", async () => {
    await load();
    setStatus("Reloaded the usage.");
  });
  $("usage-csv").addEventListener("click", downloadCsv);
  let width = 0;
  new ResizeObserver(() => {
    const now = $("usage-chart").clientWidth;
    if (state.data && visible() && Math.abs(now - width) > 8) {
      width = now;
      renderChart();
    }
  }).observe($("usage-chart"));
  setInterval(() => {
    if (session.key && visible() && !document.hidden && !document.querySelector("dialog[open]")) load(true);
  }, 15_000);
}
