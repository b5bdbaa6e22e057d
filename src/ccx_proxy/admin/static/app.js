// ccx-proxy admin console: plain ES modules, no dependencies, no build step.
// This one: sign-in, the page switcher (Overview, Messages, Members, Usage) and the Messages page,
// which talks to the admin API under /api/messages/ with the admin key (kept in sessionStorage).
// members.js and usage.js are the team pages, overview.js the live numbers; core.js what they all share.

import {
  $, GATEWAY_ROOT, announce, clearFormErrors, code, confirmAction, copyText, esc, lines, nextId, request,
  session, truncate,
} from "./core.js";
import * as members from "./members.js";
import * as overview from "./overview.js";
import * as usage from "./usage.js";

const KEY_STORAGE = "ccx-admin-key";
const API_BASE = new URL("../api/messages/", location.href);
const REFRESH_MS = 5000;
const TEST_MODELS = ["claude-haiku-4-5", "claude-sonnet-4-6", "claude-opus-4-1"];
const MANAGED_FIELDS = [
  "name", "serviceType", "baseUrl", "baseUrls", "apiKeys", "authHeader", "modelMapping",
  "supportedModels", "priority", "status", "customHeaders", "connectTimeoutMs",
  "responseHeaderTimeoutMs", "streamInactivityTimeoutMs", "keepaliveMs",
  "thinkingSignatures", "thinkingPassback", "stripBillingBlock",
];
const TIMEOUT_FIELDS = ["connectTimeoutMs", "responseHeaderTimeoutMs", "streamInactivityTimeoutMs", "keepaliveMs"];
const SIGNATURE_MODES = ["keep", "strip-foreign", "strip-all"];
// Placeholder for the client key: the console never knows PROXY_ACCESS_KEY, only its mask.
const KEY_TEMPLATE = "<your gateway key: PROXY_ACCESS_KEY>";

// The presets and the Claude Code ids GET /v1/models offers come from the server
// (GET /api/messages/info: ccx_proxy.presets, catalog.CLAUDE_CODE_MODELS): one source.
const presets = () => (state.info && state.info.presets) || {};
const claudeCodeModels = () => (state.info && state.info.claudeCodeModels) || [];

const ROW_KINDS = {
  key: { container: "key-rows", noun: "API key", fields: [
    { cls: "k-value", label: "API key", placeholder: "sk-... or ${ENV_VAR}" },
  ] },
  map: { container: "map-rows", noun: "mapping row", arrow: true, badge: true, fields: [
    { cls: "m-key", label: "Request model contains", placeholder: "sonnet" },
    { cls: "m-value", label: "Upstream model", placeholder: "upstream-model" },
  ] },
  header: { container: "header-rows", noun: "header", fields: [
    { cls: "h-name", label: "Header name", placeholder: "X-Example" },
    { cls: "h-value", label: "Header value", placeholder: "value or ${ENV_VAR}" },
  ] },
};

const state = {
  key: null, // admin key, also in sessionStorage
  page: "messages",
  info: null,
  channels: [],
  version: null, // version of the list on screen (If-Match for row actions)
  listJson: "",
  configJson: "", // the list without live state: what routing depends on
  routeModel: null, // model of the route preview on screen, re-run when the config changes
  notes: new Map(), // channel name -> {kind: "ok"|"error"|"pending", html}
  editing: null, // channel being edited (null: adding)
  formVersion: null, // version the form was opened at (If-Match for its save)
  submitted: { apiKeys: [] }, // the form row of each API key sent
  opener: null, // element that gets focus back when the dialog closes
  busy: 0,
};

// ---------------------------------------------------------------- helpers

function setStatus(text, isError = false) {
  const line = $("status-line");
  line.textContent = text;
  line.classList.toggle("error-text", isError);
}

async function api(method, path, body, opts = {}) {
  const headers = {};
  const version = opts.version ?? state.version;
  if (method !== "GET" && version) headers["if-match"] = `"${version}"`;
  return request(method, new URL(path, API_BASE), { body, key: opts.key, headers });
}

const channelPath = (name, suffix = "") => `channels/${encodeURIComponent(name)}${suffix}`;

// -------------------------------------------------- mapping and allowlist

/** Which key of `entries` ([key, value] pairs) serves `model`: exact, else longest contained. */
function lookup(entries, model) {
  const exact = entries.find(([k]) => k === model);
  if (exact) return { key: exact[0], target: exact[1], exact: true, shorter: [] };
  const hits = entries
    .filter(([k]) => k && model.includes(k))
    .sort((a, b) => b[0].length - a[0].length || (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
  if (!hits.length) return null;
  return { key: hits[0][0], target: hits[0][1], exact: false, shorter: hits.slice(1).map((h) => h[0]) };
}

function patternMatches(p, model) {
  if (p === "*" || p === "**") return true;
  if (p.length >= 2 && p.startsWith("*") && p.endsWith("*")) return model.includes(p.slice(1, -1));
  if (p.startsWith("*")) return model.endsWith(p.slice(1));
  if (p.endsWith("*")) return model.startsWith(p.slice(0, -1));
  return model === p;
}

function admits(patterns, model) {
  const deny = patterns.filter((p) => p.startsWith("!")).map((p) => p.slice(1));
  const allow = patterns.filter((p) => !p.startsWith("!"));
  if (deny.some((p) => patternMatches(p, model))) return false;
  return !allow.length || allow.some((p) => patternMatches(p, model));
}

function serves(channel, model) {
  const mapped = lookup(Object.entries(channel.modelMapping || {}), model);
  const patterns = channel.supportedModels || [];
  return { mapped, ok: admits(patterns, model) || admits(patterns, mapped ? mapped.target : model) };
}

/** A model name worth probing: one the channel maps and admits, else one it admits. */
function testModel(channel) {
  const admitted = TEST_MODELS.filter((m) => serves(channel, m).ok);
  const mapped = admitted.find((m) => serves(channel, m).mapped);
  const exact = (channel.supportedModels || []).find((p) => !p.includes("*") && !p.startsWith("!"));
  return mapped || admitted[0] || exact || TEST_MODELS[0];
}

// ---------------------------------------------------------- sign in / out

// ---------------------------------------------------------- pages

const PAGES = {
  overview: { label: "Overview", view: "overview-view", title: "overview-title", show: overview.show },
  messages: { label: "Messages", view: "messages-view", title: "messages-title", show: () => loadChannels() },
  members: { label: "Members", view: "members-view", title: "members-title", show: members.show },
  usage: { label: "Usage", view: "usage-view", title: "usage-title", show: usage.show },
};

const pageFromHash = () => {
  const id = location.hash.slice(1);
  return Object.hasOwn(PAGES, id) ? id : null;
};

/** Show one page: its section, the nav link marked current, the tab's title; load its data. */
async function showPage(name, focus) {
  state.page = name;
  for (const [id, page] of Object.entries(PAGES)) $(page.view).hidden = id !== name;
  for (const link of $("nav").querySelectorAll("a[data-page]")) {
    if (link.dataset.page === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `${PAGES[name].label} · ccx-proxy admin`;
  if (focus) $(PAGES[name].title).focus();
  await PAGES[name].show();
}

function showSignIn(message = "") {
  for (const page of Object.values(PAGES)) $(page.view).hidden = true;
  document.title = "ccx-proxy admin";
  $("nav").hidden = true;
  $("sign-out").hidden = true;
  $("server-info").textContent = "";
  $("signin-view").hidden = false;
  const error = $("signin-error");
  error.textContent = message;
  error.hidden = !message;
  $("admin-key").setAttribute("aria-invalid", message ? "true" : "false");
  $("admin-key").focus();
}

function signOut(message = "") {
  sessionStorage.removeItem(KEY_STORAGE);
  state.key = null;
  session.key = null;
  state.notes.clear();
  state.configJson = "";
  state.routeModel = null;
  $("route-result").replaceChildren();
  members.forget();
  for (const dialog of document.querySelectorAll("dialog[open]")) dialog.close();
  showSignIn(message);
}

async function signIn(key, restoring = false) {
  try {
    state.info = await api("GET", "info", undefined, { key });
  } catch (err) {
    const why = err.status === 401 ? "That key was not accepted" : "Could not sign in";
    showSignIn(restoring && err.status === 401 ? "Your saved admin key is no longer valid: sign in again."
      : `${why}: ${err.message}`);
    if (err.status === 401) sessionStorage.removeItem(KEY_STORAGE);
    return;
  }
  state.key = key;
  session.key = key;
  sessionStorage.setItem(KEY_STORAGE, key);
  $("admin-key").value = "";
  $("signin-view").hidden = true;
  $("nav").hidden = false;
  $("sign-out").hidden = false;
  renderInfo();
  const page = pageFromHash() || "messages";
  await showPage(page, false);
  if (!restoring) $(PAGES[page].title).focus();
}

function renderInfo() {
  const info = state.info || {};
  $("server-info").innerHTML = `v${esc(info.version)} · <span title="${esc(info.channelsFile)}">` +
    `${esc(truncate(info.channelsFile || "", 48))}</span> · ${esc(info.backupsKept)} backups kept`;
  // Only a template: the real key never reaches the console, and its mask must not pass for it.
  $("connect-snippet").textContent =
    `export ANTHROPIC_BASE_URL="${GATEWAY_ROOT}"\n` +
    `export ANTHROPIC_API_KEY="${KEY_TEMPLATE}"`;
  const hint = info.proxyKeyHint && info.proxyKeyHint.replace(/^sk-/, "") !== "…" ? info.proxyKeyHint : "";
  $("connect-key-hint").innerHTML = hint ? ` (the key shown masked as ${code(hint)})` : "";
}

// ---------------------------------------------------------- channel list

/** Channels in routing order (priority, then file order), each with its effective priority. */
function ordered(channels = state.channels) {
  return channels
    .map((c, i) => ({ c, i, p: Number.isInteger(c.priority) ? c.priority : i + 1 }))
    .sort((a, b) => a.p - b.p || a.i - b.i)
    .map((x) => ({ channel: x.c, priority: x.p }));
}

async function loadChannels(quiet = false) {
  try {
    const data = await api("GET", "channels");
    state.version = data.version;
    const json = JSON.stringify(data.channels);
    $("list-error").hidden = true;
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    if (quiet && json === state.listJson) return;
    state.channels = data.channels;
    state.listJson = json;
    renderTable();
    const config = JSON.stringify(data.channels.map(({ state: live, ...c }) => c));
    if (config !== state.configJson) {
      state.configJson = config;
      renderRouteConfig();
      if (state.routeModel) await previewRoute(state.routeModel, true);
    }
  } catch (err) {
    if (err.status === 401) return;
    $("list-error").textContent = `Could not load the channels: ${err.message}`;
    $("list-error").hidden = false;
  }
}

function rowHtml({ channel: c, priority }, index, count) {
  const name = esc(c.name);
  const status = c.status || "active";
  const urls = c.baseUrls || [];
  const keys = c.apiKeys || [];
  const mapping = Object.entries(c.modelMapping || {});
  const allow = c.supportedModels || [];
  const toggle = status === "active" ? "Disable" : "Enable";
  const note = state.notes.get(c.name);

  const keyList = keys.length
    ? `<ul class="plain">${keys.map((k) => `<li>${code(k)}</li>`).join("")}</ul>`
    : `<span class="muted">none</span>`;
  const shown = mapping.slice(0, 3).map(([k, v]) => `<li>${code(k)} → ${code(v)}</li>`).join("");
  const more = mapping.length > 3
    ? `<li class="muted" title="${esc(mapping.slice(3).map(([k, v]) => `${k} → ${v}`).join(", "))}">` +
      `+${mapping.length - 3} more</li>` : "";
  const models = (mapping.length ? `<ul class="plain">${shown}${more}</ul>`
    : `<span class="muted">no mapping</span>`) +
    (allow.length ? `<div class="sub">allow: ${allow.map(code).join(" ")}</div>` : "");

  return `<tr data-name="${name}" class="${status === "active" ? "" : "inactive"}">
    <td class="num" data-label="Priority">${esc(priority)}</td>
    <th scope="row"><span class="name">${name}</span><span class="sub">${esc(c.serviceType || "claude")}</span></th>
    <td class="status" data-label="Status"><span class="badge status-${esc(status)}">${esc(status)}</span></td>
    <td class="url" data-label="Base URL"><span class="mono">${esc(c.baseUrl)}</span>${urls.length
      ? `<span class="sub" title="${esc(urls.join("\n"))}">+${urls.length} more URL${urls.length > 1 ? "s" : ""}</span>` : ""}
      <span class="sub">auth: ${esc(c.authHeader || "auto")}</span>${thinkingHtml(c)}</td>
    <td class="keys" data-label="Keys">${keyList}</td>
    <td class="models" data-label="Models">${models}</td>
    <td class="live" data-label="Live state">${liveHtml(c)}</td>
    <td class="actions" data-label="Actions"><div class="btns">
      <button type="button" data-action="test" aria-label="Test ${name}">Test</button>
      <button type="button" data-action="edit" aria-label="Edit ${name}">Edit</button>
      <button type="button" data-action="toggle" aria-label="${toggle} ${name}">${toggle}</button>
    </div><div class="btns">
      <button type="button" data-action="up" aria-label="Move ${name} up" ${index === 0 ? "disabled" : ""}>↑</button>
      <button type="button" data-action="down" aria-label="Move ${name} down"
        ${index === count - 1 ? "disabled" : ""}>↓</button>
      <button type="button" data-action="delete" class="danger-text" aria-label="Delete ${name}">Delete</button>
    </div></td>
  </tr>${note ? `<tr class="note-row" data-name="${name}"><td class="spacer"></td><td colspan="7">
    <div class="note note-${note.kind}"><span>${note.html}</span>${note.kind === "pending" ? ""
      : `<button type="button" class="link" data-action="dismiss" aria-label="Dismiss the message for ${name}">Dismiss</button>`}
    </div></td></tr>` : ""}`;
}

function thinkingHtml(c) {
  const on = [
    c.thinkingSignatures && c.thinkingSignatures !== "keep" ? `signatures ${c.thinkingSignatures}` : null,
    c.thinkingPassback === true ? "passback" : null,
    c.stripBillingBlock === true ? "strip billing line" : null,
  ].filter(Boolean);
  return on.length ? `<span class="sub">thinking: ${esc(on.join(", "))}</span>` : "";
}

function liveHtml(c) {
  const s = c.state || {};
  const active = (c.status || "active") === "active";
  const health = active ? s.health || "idle" : "not serving";
  const cls = { healthy: "ok", idle: "idle", "not serving": "idle", suspended: "idle", disabled: "idle",
    "circuit open": "bad", "keys disabled": "bad" }[health] || "warn";
  const stats = s.requests
    ? `${s.requests} req · ${s.successRate == null ? "–" : `${Math.round(s.successRate * 1000) / 10}% ok`}` +
      `${s.ttfbP50Ms == null ? "" : ` · p50 ${s.ttfbP50Ms < 10 ? s.ttfbP50Ms.toFixed(1) : Math.round(s.ttfbP50Ms)} ms`}`
    : "no requests yet";
  const keys = (s.keys || []).filter((k) => k.state !== "ok")
    .map((k) => `<div class="sub warn-text" title="${esc(k.lastError)}">key ${esc(k.key)}: ${esc(k.state)}</div>`)
    .join("");
  const error = s.lastError
    ? `<div class="last-error" title="${esc(s.lastError)}">${esc(truncate(s.lastError, 90))}</div>` : "";
  return `<span class="badge health-${cls}">${esc(health)}</span><div class="sub">${stats}</div>${keys}${error}`;
}

function renderTable() {
  const active = document.activeElement;
  const focus = active && $("channel-rows").contains(active) && active.dataset.action
    ? { name: active.closest("tr").dataset.name, action: active.dataset.action } : null;
  const rows = ordered();
  $("channel-rows").innerHTML = rows.length
    ? rows.map((row, i) => rowHtml(row, i, rows.length)).join("")
    : `<tr><td colspan="8" class="empty">No channels yet: add one, or start from a preset.</td></tr>`;
  if (focus) focusRowButton(focus.name, focus.action);
}

function focusRowButton(name, action) {
  const row = [...$("channel-rows").querySelectorAll("tr:not(.note-row)")].find((r) => r.dataset.name === name);
  if (!row) return false;
  const fallback = { up: "down", down: "up", dismiss: "test" }[action];
  const button = [action, fallback, "edit"]
    .map((a) => row.querySelector(`[data-action="${a}"]`)).find((b) => b && !b.disabled);
  if (button) button.focus();
  return Boolean(button);
}

function setNote(name, kind, html) {
  state.notes.set(name, { kind, html });
  renderTable();
}

/** Run a write for one row; its error (or a conflict) is shown under that row.
 * `done` is the status line on success, or a function of the write's result giving it. */
async function rowWrite(name, label, write, done) {
  state.busy += 1;
  try {
    const result = await write();
    state.notes.delete(name);
    const [text, isError] = [].concat(typeof done === "function" ? done(result) : done);
    setStatus(text, Boolean(isError));
  } catch (err) {
    const conflict = err.status === 409
      ? " The list has been reloaded with the other change; try again if you still want this." : "";
    const why = err.problems && err.problems.length
      ? err.problems.map((p) => `${p.field}: ${p.message}`).join("; ") : err.message;
    state.notes.set(name, { kind: "error", html: `${esc(label)} failed: ${esc(why)}${conflict}` });
    setStatus(`${label} failed.`, true);
    announce(`${label} failed: ${err.message}`);
  } finally {
    state.busy -= 1;
  }
  await loadChannels();
  renderTable();
}

async function testChannel(channel) {
  const model = testModel(channel);
  setNote(channel.name, "pending", `Testing ${esc(channel.name)} with count_tokens for ${code(model)}…`);
  let html;
  let kind = "error";
  try {
    const r = await api("POST", channelPath(channel.name, "/test"), { mode: "count_tokens", model, keyIndex: 0 });
    kind = r.ok ? "ok" : "error";
    const route = `${code(r.model)}${r.upstreamModel && r.upstreamModel !== r.model ? ` → ${code(r.upstreamModel)}` : ""}`;
    const facts = [r.status != null ? `HTTP ${r.status}` : null, r.latencyMs != null ? `${r.latencyMs} ms` : null]
      .filter(Boolean).join(" · ");
    html = r.ok
      ? `<strong>OK</strong> · ${facts} · ${esc(r.mode)} ${route}`
      : `<strong>Failed</strong>${facts ? ` · ${facts}` : ""} · ${esc(r.error || "no details")} (${route})`;
  } catch (err) {
    html = `<strong>Test failed</strong>: ${esc(err.message)}`;
  }
  setNote(channel.name, kind, html);
  const plain = document.createElement("div");
  plain.innerHTML = html;
  announce(`Test of ${channel.name}: ${plain.textContent}`);
}

async function move(name, delta) {
  const names = ordered().map((r) => r.channel.name);
  const i = names.indexOf(name);
  const j = i + delta;
  if (i < 0 || j < 0 || j >= names.length) return;
  [names[i], names[j]] = [names[j], names[i]];
  await rowWrite(name, `Moving ${name}`, () => api("POST", "channels/reorder", { names }),
    `Moved ${name} ${delta < 0 ? "up" : "down"}: it is now number ${j + 1}.`);
}

/** Delete; the server renumbers the rest 1..n in the same write (no gaps). */
async function deleteChannel(name) {
  const left = await api("DELETE", channelPath(name));
  return { count: (left.channels || []).length };
}

function confirmDelete(name) {
  return confirmAction({
    title: "Delete channel?",
    text: `"${name}" is removed from the channels file at once ` +
      "(the previous file is kept in the backups folder next to it).",
    action: "Delete",
  });
}

async function onTableClick(event) {
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  const name = button.closest("tr").dataset.name;
  const channel = state.channels.find((c) => c.name === name);
  if (!channel) return;
  const action = button.dataset.action;
  if (action === "test") {
    button.disabled = true;
    await testChannel(channel);
    focusRowButton(name, "test");
  } else if (action === "edit") {
    openForm(channel, button);
  } else if (action === "toggle") {
    const status = channel.status === "active" || channel.status === undefined ? "disabled" : "active";
    await rowWrite(name, `${status === "active" ? "Enabling" : "Disabling"} ${name}`,
      () => api("PATCH", channelPath(name, "/status"), { status }), `${name} is now ${status}.`);
    focusRowButton(name, "toggle");
  } else if (action === "up" || action === "down") {
    await move(name, action === "up" ? -1 : 1);
    focusRowButton(name, action);
  } else if (action === "delete") {
    if (!(await confirmDelete(name))) {
      focusRowButton(name, "delete");
      return;
    }
    await rowWrite(name, `Deleting ${name}`, () => deleteChannel(name), ({ count }) =>
      `Deleted channel ${name}${count ? `; the others are numbered 1 to ${count}` : ""}.`);
    if (!focusRowButton(name, "delete")) $("add-channel").focus();
  } else if (action === "dismiss") {
    state.notes.delete(name);
    renderTable();
    focusRowButton(name, "test");
  }
}

// ------------------------------------------------------ connect / route

async function copySnippet() {
  const text = $("connect-snippet").textContent;
  const button = $("copy-connect");
  const ok = await copyText(text, button);
  button.textContent = ok ? "Copied" : "Copy failed";
  announce(ok ? `Copied the two export lines, a template: replace ${KEY_TEMPLATE} with the gateway's ` +
    "PROXY_ACCESS_KEY before running them."
    : "Copying failed: select the lines and copy them yourself.");
  if (!ok) getSelection().selectAllChildren($("connect-snippet"));
  setTimeout(() => { button.textContent = "Copy template"; }, 2000);
}

async function showRoute(event) {
  event.preventDefault();
  const input = $("route-model");
  const model = input.value.trim();
  input.setAttribute("aria-invalid", model ? "false" : "true");
  if (!model) {
    state.routeModel = null;
    $("route-result").innerHTML = `<p class="error-text">Enter a model name, e.g. ${code("claude-sonnet-4-6")}.</p>`;
    return;
  }
  await previewRoute(model);
}

/** Ask the gateway where `model` goes; `refreshed`: re-run because the channels changed. */
async function previewRoute(model, refreshed = false) {
  const out = $("route-result");
  state.routeModel = model;
  const when = refreshed ? `<p class="hint">Updated for the current channels at ${esc(new Date().toLocaleTimeString())}.</p>` : "";
  try {
    const r = await api("GET", `route?model=${encodeURIComponent(model)}`);
    if (state.routeModel !== model) return; // a newer preview was asked for meanwhile
    if (!r.channel) {
      out.innerHTML = `<p class="error-text">No active channel serves ${code(model)}: clients get ` +
        `400 model_not_found (with the list of models this gateway serves).</p>${when}`;
      return;
    }
    const rest = r.candidates.slice(1).map((c) => `${esc(c.channel)} (${code(c.upstreamModel)})`);
    out.innerHTML = `<p>${code(model)} → channel <strong>${esc(r.channel)}</strong>, upstream model ` +
      `${code(r.upstreamModel)}</p>` + (rest.length ? `<p class="hint">Fails over to: ${rest.join(", ")}</p>`
      : `<p class="hint">No other channel would take it.</p>`) + when;
  } catch (err) {
    if (err.status === 401) return;
    out.innerHTML = `<p class="error-text">Could not preview the route: ${esc(err.message)}</p>`;
  }
}

/** The ids GET /v1/models lists, as catalog.served_ids builds them: active channels in order. */
function servedModels() {
  const ids = new Set();
  for (const { channel: c } of ordered()) {
    if ((c.status || "active") !== "active") continue;
    const keys = Object.keys(c.modelMapping || {});
    const exact = (c.supportedModels || []).filter((p) => !p.includes("*") && !p.startsWith("!"));
    const candidates = (c.models || []).length ? c.models : exact.length ? exact
      : claudeCodeModels().filter((m) => !keys.length || keys.some((k) => m.includes(k)));
    for (const m of candidates) if (serves(c, m).ok) ids.add(m);
  }
  return [...ids];
}

/** The "Try it" panel's view of the config: suggestions and the serving order. */
function renderRouteConfig() {
  const models = servedModels();
  $("route-models").replaceChildren(...models.map((m) => Object.assign(document.createElement("option"), { value: m })));
  const active = ordered().filter(({ channel: c }) => (c.status || "active") === "active");
  $("route-config").innerHTML = active.length
    ? `<p class="hint">Serving now, in order: ${active.map(({ channel: c }) => `<strong>${esc(c.name)}</strong>`)
      .join(" → ")}.</p><p class="hint">Model ids clients are offered: ${models.length
      ? models.map(code).join(" ") : "none"}</p>`
    : `<p class="error-text">No channel is active: every request is refused.</p>`;
}

// ------------------------------------------------------------ the form

function addRow(kind, values = [], { existing = false, focus = false } = {}) {
  const spec = ROW_KINDS[kind];
  const row = document.createElement("div");
  row.className = `row row-${kind}`;
  spec.fields.forEach((f, i) => {
    if (i === 1 && spec.arrow) row.insertAdjacentHTML("beforeend", `<span class="arrow" aria-hidden="true">→</span>`);
    const input = Object.assign(document.createElement("input"), {
      type: "text", className: `mono ${f.cls}`, placeholder: f.placeholder, value: values[i] ?? "",
      spellcheck: false, autocomplete: "off",
    });
    if (existing) {
      input.readOnly = true;
      input.title = "Saved key, shown masked. Remove it, or add a new key.";
      row.dataset.existing = "true";
    }
    row.append(input);
  });
  if (spec.badge) row.insertAdjacentHTML("beforeend", `<span class="hit-badge"></span>`);
  row.insertAdjacentHTML("beforeend", `<button type="button" class="small" data-remove>Remove</button>`);
  $(spec.container).append(row);
  relabel(kind);
  if (focus) row.querySelector("input").focus();
  return row;
}

function relabel(kind) {
  const spec = ROW_KINDS[kind];
  [...$(spec.container).children].forEach((row, n) => {
    row.querySelectorAll("input").forEach((input, i) => input.setAttribute("aria-label",
      `${spec.fields[i].label}, ${spec.noun === "API key" ? "key" : "row"} ${n + 1}`));
    row.querySelector("[data-remove]").setAttribute("aria-label", `Remove ${spec.noun} ${n + 1}`);
  });
}

function rowValues(kind) {
  return [...$(ROW_KINDS[kind].container).children]
    .map((row) => ({ row, values: [...row.querySelectorAll("input")].map((i) => i.value.trim()) }));
}

function clearRows(kind) {
  $(ROW_KINDS[kind].container).replaceChildren();
}

function onRowsClick(event) {
  const remove = event.target.closest("[data-remove]");
  if (!remove) return;
  const row = remove.closest(".row");
  const container = row.parentElement;
  const kind = Object.keys(ROW_KINDS).find((k) => ROW_KINDS[k].container === container.id);
  const next = row.nextElementSibling || row.previousElementSibling;
  row.remove();
  relabel(kind);
  (next ? next.querySelector("[data-remove]") : $(`add-${kind}`)).focus();
  updateMapResult();
}

function openForm(channel, opener) {
  const form = $("channel-form");
  state.editing = channel ? structuredClone(channel) : null;
  state.formVersion = state.version;
  state.opener = opener;
  form.reset();
  clearErrors();
  ["key", "map", "header"].forEach(clearRows);
  $("form-title").textContent = channel ? `Edit channel ${channel.name}` : "Add channel";
  $("presets").hidden = Boolean(channel);
  $("form-note").textContent = "";
  const c = channel || { status: "active", serviceType: "claude", authHeader: "auto" };
  const select = $("f-serviceType");
  select.querySelectorAll("option.extra").forEach((o) => o.remove());
  if (c.serviceType && c.serviceType !== "claude") {
    select.insertAdjacentHTML("beforeend", `<option class="extra" value="${esc(c.serviceType)}">${esc(c.serviceType)}</option>`);
  }
  $("f-name").value = c.name || "";
  select.value = c.serviceType || "claude";
  $("f-status").value = c.status || "active";
  $("f-priority").value = Number.isInteger(c.priority) ? c.priority : "";
  $("f-baseUrl").value = c.baseUrl || "";
  $("f-baseUrls").value = (c.baseUrls || []).join("\n");
  $("f-authHeader").value = c.authHeader || "auto";
  (c.apiKeys || []).forEach((k) => addRow("key", [k], { existing: true }));
  if (!channel) addRow("key");
  Object.entries(c.modelMapping || {}).forEach(([k, v]) => addRow("map", [k, v]));
  if (!channel) addRow("map");
  $("f-supportedModels").value = (c.supportedModels || []).join("\n");
  Object.entries(c.customHeaders || {}).forEach(([k, v]) => addRow("header", [k, v]));
  TIMEOUT_FIELDS.forEach((f) => { $(`f-${f}`).value = Number.isInteger(c[f]) ? c[f] : ""; });
  setThinking(c);
  $("map-sample").value = "";
  updateMapResult();
  $("channel-dialog").showModal();
  $("f-name").focus();
}

/** The thinking options of `c` (a channel or a preset's `thinking`) into the form; absent: the default. */
function setThinking(c) {
  $("f-thinkingSignatures").value = SIGNATURE_MODES.includes(c.thinkingSignatures) ? c.thinkingSignatures : "keep";
  $("f-thinkingPassback").checked = c.thinkingPassback === true;
  $("f-stripBillingBlock").checked = c.stripBillingBlock === true;
}

function applyPreset(id) {
  const p = presets()[id];
  if (!p) return;
  const c = p.channel;
  const name = $("f-name");
  const presetNames = Object.values(presets()).map((x) => x.channel.name);
  if (!name.value.trim() || presetNames.some((n) => name.value.trim().startsWith(n))) {
    const taken = new Set(state.channels.map((ch) => ch.name));
    let candidate = c.name;
    for (let n = 2; taken.has(candidate); n += 1) candidate = `${c.name}-${n}`;
    name.value = candidate;
  }
  $("f-serviceType").value = c.serviceType || "claude";
  $("f-baseUrl").value = c.baseUrl;
  $("f-authHeader").value = c.authHeader || "auto";
  const key = (c.apiKeys || [])[0] || "";
  const keys = rowValues("key").filter((r) => r.values[0]);
  const presetKeys = Object.values(presets()).map((x) => (x.channel.apiKeys || [])[0]);
  if (keys.every((r) => presetKeys.includes(r.values[0]))) {
    clearRows("key");
    addRow("key", [key]);
  }
  const mapping = c.modelMapping || {};
  clearRows("map");
  Object.entries(mapping).forEach(([k, v]) => addRow("map", [k, v]));
  if (!Object.keys(mapping).length) addRow("map");
  $("f-supportedModels").value = (c.supportedModels || []).join("\n");
  setThinking(c);
  const variable = key.startsWith("${") ? key.slice(2, -1) : "";
  $("form-note").textContent = `${p.label} preset (checked ${state.info.presetsChecked}): ` +
    (variable ? `the gateway reads the key from $${variable}; export it before starting the gateway, ` +
      "or save with status disabled for now." : "fill in the key.");
  updateMapResult();
  announce(`Filled in the ${p.label} preset: base URL, auth header, model mapping, thinking options ` +
    `and key ${key}.`);
}

function updateMapResult() {
  const out = $("map-result");
  const sample = $("map-sample").value.trim();
  const rows = rowValues("map");
  for (const { row } of rows) {
    row.classList.remove("hit", "shadowed");
    row.querySelector(".hit-badge").textContent = "";
  }
  if (!sample) {
    out.textContent = "Type a requested model name to see which row it hits.";
    return;
  }
  const entries = rows.filter((r) => r.values[0]).map((r) => r.values);
  const hit = lookup(entries, sample);
  const patterns = lines($("f-supportedModels").value);
  let text;
  if (!hit) {
    text = `${sample}: no key matches, sent upstream unchanged.`;
  } else {
    const byKey = (k) => rows.find((r) => r.values[0] === k).row;
    byKey(hit.key).classList.add("hit");
    byKey(hit.key).querySelector(".hit-badge").textContent = "wins";
    for (const k of hit.shorter) {
      byKey(k).classList.add("shadowed");
      byKey(k).querySelector(".hit-badge").textContent = "shorter";
    }
    text = `${sample} → ${hit.target || "(empty)"} via ${hit.exact ? "exact key" : "longest matching key"} ` +
      `“${hit.key}”${hit.shorter.length ? `, beating ${hit.shorter.map((k) => `“${k}”`).join(", ")}` : ""}.`;
  }
  if (patterns.length) {
    const ok = admits(patterns, sample) || (hit && admits(patterns, hit.target));
    text += ok ? " The allowlist admits it." : " The allowlist rejects it: this channel would not serve it.";
  }
  out.textContent = text;
}

function integerField(field, errors) {
  const input = $(`f-${field}`);
  if (input.validity.badInput) {
    errors.push({ field, message: "must be a whole number" });
    return undefined;
  }
  return input.value.trim() === "" ? undefined : Number(input.value);
}

/** The channel object to send, omitting empty optional fields, plus client-side problems. */
function collect() {
  const errors = [];
  const body = {};
  const base = state.editing ? { ...state.editing } : {};
  delete base.state;
  MANAGED_FIELDS.forEach((f) => delete base[f]);

  body.name = $("f-name").value.trim();
  if (!body.name) errors.push({ field: "name", message: "enter a name" });
  body.serviceType = $("f-serviceType").value;
  body.baseUrl = $("f-baseUrl").value.trim();
  if (!body.baseUrl) errors.push({ field: "baseUrl", message: "enter the upstream's base URL" });
  const urls = lines($("f-baseUrls").value);
  if (urls.length) body.baseUrls = urls;

  const keyRows = rowValues("key").filter((r) => r.values[0]);
  state.submitted.apiKeys = keyRows.map((r) => r.row);
  if (keyRows.length) body.apiKeys = keyRows.map((r) => r.values[0]);
  else if (state.editing && (state.editing.apiKeys || []).length) body.apiKeys = []; // removed them all
  body.authHeader = $("f-authHeader").value;

  const mapping = {};
  for (const { row, values: [key, value] } of rowValues("map")) {
    if (!key && !value) continue;
    if (!key) errors.push({ row, message: "enter the request model text to match" });
    else if (!value) errors.push({ row, message: `enter the upstream model for “${key}”` });
    else if (key in mapping) errors.push({ row, message: `“${key}” is already mapped in another row` });
    else mapping[key] = value;
  }
  if (Object.keys(mapping).length) body.modelMapping = mapping;
  const patterns = lines($("f-supportedModels").value);
  if (patterns.length) body.supportedModels = patterns;

  const priority = integerField("priority", errors);
  if (priority !== undefined) body.priority = priority;
  body.status = $("f-status").value;

  const headers = {};
  for (const { row, values: [key, value] } of rowValues("header")) {
    if (!key && !value) continue;
    if (!key) errors.push({ row, message: "enter the header name" });
    else if (!value) errors.push({ row, message: `enter a value for ${key}` });
    else if (Object.keys(headers).some((h) => h.toLowerCase() === key.toLowerCase())) {
      errors.push({ row, message: `${key} is set twice` });
    } else headers[key] = value;
  }
  if (Object.keys(headers).length) body.customHeaders = headers;
  for (const field of TIMEOUT_FIELDS) {
    const value = integerField(field, errors);
    if (value !== undefined) body[field] = value;
  }
  // Defaults are left out, as the file's own defaults say the same thing.
  const signatures = $("f-thinkingSignatures").value;
  if (signatures !== "keep") body.thinkingSignatures = signatures;
  if ($("f-thinkingPassback").checked) body.thinkingPassback = true;
  if ($("f-stripBillingBlock").checked) body.stripBillingBlock = true;
  return { body: { ...body, ...base }, errors };
}

/** Where a problem's field (e.g. "apiKeys[0]", "modelMapping.opus") lives in the form. */
function problemTarget(field) {
  const form = $("channel-form");
  const m = /^([A-Za-z]+)(?:\[(\d+)\]|\.(.+))?$/.exec(field || "");
  if (!m) return null;
  const [, name, index, sub] = m;
  const rowsOf = (kind) => rowValues(kind);
  if (name === "apiKeys" && index !== undefined) return state.submitted.apiKeys[Number(index)] || null;
  if (name === "modelMapping" && sub) return rowsOf("map").find((r) => r.values[0] === sub)?.row || null;
  if (name === "customHeaders" && sub) {
    return rowsOf("header").find((r) => r.values[0].toLowerCase() === sub.toLowerCase())?.row || null;
  }
  return form.querySelector(`[data-field="${name}"]`);
}

function clearErrors() {
  clearFormErrors($("channel-form"), $("form-errors"));
}

/** Editing a field that has an error clears that error (the summary goes with the last one). */
function onFormInput(event) {
  const el = event.target.closest("input, select, textarea");
  const id = el && el.dataset.errorId;
  if (!id) return;
  const scope = el.closest(".row") || el.closest("[data-field]") || el;
  scope.querySelectorAll(`[data-error-id="${id}"]`).forEach((other) => {
    other.removeAttribute("aria-invalid");
    const ids = (other.getAttribute("aria-describedby") || "").split(" ").filter((x) => x !== id);
    if (ids.length) other.setAttribute("aria-describedby", ids.join(" "));
    else other.removeAttribute("aria-describedby");
    delete other.dataset.errorId;
  });
  $(id)?.remove();
  if (!$("channel-form").querySelector(".field-error.dyn")) $("form-errors").hidden = true;
}

function showErrors(problems, heading) {
  clearErrors();
  const items = [];
  let first = null;
  for (const p of problems) {
    const target = p.row || problemTarget(p.field);
    const label = p.field || "";
    items.push(`<li>${label ? `<strong>${esc(label)}</strong>: ` : ""}${esc(p.message)}</li>`);
    if (!target) continue;
    const id = nextId("err");
    const message = Object.assign(document.createElement("p"), {
      id, className: "field-error dyn", textContent: p.message,
    });
    const controls = target.matches("input, select, textarea") ? [target]
      : [...target.querySelectorAll("input, select, textarea")].filter((el) => !el.closest(".row") || target.matches(".row"));
    if (target.matches("fieldset")) target.querySelector("legend").after(message);
    else target.append(message);
    for (const el of controls) {
      el.setAttribute("aria-invalid", "true");
      el.setAttribute("aria-describedby", `${el.getAttribute("aria-describedby") || ""} ${id}`.trim());
      el.dataset.errorId = id;
    }
    first = first || controls[0] || null;
  }
  const box = $("form-errors");
  box.innerHTML = `<p><strong>${esc(heading || `The channel was not saved: ${problems.length} problem` +
    `${problems.length === 1 ? "" : "s"}`)}</strong></p><ul>${items.join("")}</ul>`;
  box.hidden = false;
  box.focus();
  box.scrollIntoView({ block: "nearest" });
  return first;
}

async function submitForm(event) {
  event.preventDefault();
  const { body, errors } = collect();
  if (errors.length) {
    showErrors(errors.map((e) => ({ field: e.field, row: e.row, message: e.message })));
    return;
  }
  clearErrors();
  const save = $("save-channel");
  save.disabled = true;
  save.textContent = "Saving…";
  state.busy += 1;
  const editing = state.editing;
  try {
    const saved = editing
      ? await api("PUT", channelPath(editing.name), body, { version: state.formVersion })
      : await api("POST", "channels", body, { version: state.formVersion });
    if (editing) state.notes.delete(editing.name);
    state.opener = null;
    $("channel-dialog").close();
    setStatus(`${editing ? "Saved" : "Added"} channel ${saved.name}.`);
    await loadChannels();
    if (!focusRowButton(saved.name, "edit")) $("add-channel").focus();
  } catch (err) {
    if (err.status === 409) {
      await loadChannels();
      state.formVersion = state.version;
      const fresh = editing && state.channels.find((c) => c.name === editing.name);
      if (fresh) state.editing = structuredClone(fresh);
      showErrors([{ message: err.message }], "Someone else changed the channels file meanwhile. The list " +
        "behind this form has been reloaded; check it, then save again to apply your edit on top.");
    } else if (err.problems && err.problems.length) {
      showErrors(err.problems.map((p) => ({ field: p.field, message: p.message })));
    } else {
      const m = /^([A-Za-z]+(?:\[\d+\]|\.[^:\s]+)?): (.*)$/s.exec(err.message);
      showErrors([m && problemTarget(m[1]) ? { field: m[1], message: m[2] } : { message: err.message }]);
    }
  } finally {
    state.busy -= 1;
    save.disabled = false;
    save.textContent = "Save channel";
  }
}

// ------------------------------------------------------------- wiring

function init() {
  $("signin-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("admin-key").value.trim();
    if (!key) showSignIn("Enter the admin access key.");
    else signIn(key);
  });
  $("sign-out").addEventListener("click", () => signOut("Signed out."));
  $("refresh").addEventListener("click", async () => {
    await loadChannels();
    setStatus("Reloaded the channel list.");
  });
  $("add-channel").addEventListener("click", (event) => openForm(null, event.currentTarget));
  $("channel-rows").addEventListener("click", onTableClick);
  $("copy-connect").addEventListener("click", copySnippet);
  $("route-form").addEventListener("submit", showRoute);

  const dialog = $("channel-dialog");
  $("channel-form").addEventListener("submit", submitForm);
  $("channel-form").addEventListener("input", onFormInput);
  dialog.querySelectorAll("[data-close]").forEach((b) => b.addEventListener("click", () => dialog.close()));
  dialog.addEventListener("close", () => {
    if (state.opener && state.opener.isConnected) state.opener.focus();
    else if (state.opener) focusRowButton(state.editing?.name, "edit") || $("add-channel").focus();
    state.opener = null;
  });
  $("presets").addEventListener("click", (event) => {
    const button = event.target.closest("[data-preset]");
    if (button) applyPreset(button.dataset.preset);
  });
  for (const kind of Object.keys(ROW_KINDS)) {
    $(`add-${kind}`).addEventListener("click", () => addRow(kind, [], { focus: true }));
    $(ROW_KINDS[kind].container).addEventListener("click", onRowsClick);
  }
  for (const id of ["map-rows", "map-sample", "f-supportedModels"]) $(id).addEventListener("input", updateMapResult);

  setInterval(() => {
    if (state.key && state.page === "messages" && !state.busy && !document.hidden && $("auto-refresh").checked) {
      loadChannels(true);
    }
  }, REFRESH_MS);

  session.onUnauthorized = (message) => signOut(`Signed out: ${message}`);
  window.addEventListener("hashchange", () => {
    const page = pageFromHash();
    if (state.key && page) showPage(page, true);
  });
  members.init();
  usage.init();
  overview.init();

  const saved = sessionStorage.getItem(KEY_STORAGE);
  if (saved) signIn(saved, true);
  else showSignIn();
}

init();
