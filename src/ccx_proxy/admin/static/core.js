// ccx-proxy admin console: what every page shares (DOM helpers, the admin API call,
// formatting, copying, the confirmation dialog). No dependencies, no build step.

export const GATEWAY_ROOT = new URL("../", location.href).href.replace(/\/+$/, "");
export const TEAM_API = new URL("../api/", location.href);

/** The signed-in admin key (kept in sessionStorage by app.js) and what a 401 does. */
export const session = { key: null, onUnauthorized: null };

export const $ = (id) => document.getElementById(id);
let uid = 0;
export const nextId = (prefix) => `${prefix}-${++uid}`;

export function esc(value) {
  const map = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  return String(value ?? "").replace(/[&<>"']/g, (c) => map[c]);
}

export function code(value) {
  return `<code>${esc(value)}</code>`;
}

export function truncate(text, n) {
  return text.length > n ? `${text.slice(0, n - 1)}…` : text;
}

export function lines(text) {
  return text.split("\n").map((s) => s.trim()).filter(Boolean);
}

export function announce(text) {
  const box = $("announcer");
  box.textContent = "";
  setTimeout(() => { box.textContent = text; }, 30);
}

export class ApiError extends Error {
  constructor(status, type, message, problems = []) {
    super(message);
    this.status = status;
    this.type = type;
    this.problems = problems;
  }
}

/** One admin API call: JSON in, JSON out (or the Response itself with `raw`), errors as ApiError.
 * A 401 with the session's key signs out; one with an explicit `key` (signing in) does not. */
export async function request(method, url, { body, key, headers = {}, raw = false } = {}) {
  const all = { "x-api-key": key ?? session.key, ...headers };
  if (body !== undefined) all["content-type"] = "application/json";
  let res;
  try {
    res = await fetch(url, {
      method, headers: all, cache: "no-store", body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    throw new ApiError(0, "network", `cannot reach the gateway (${err.message})`);
  }
  if (raw && res.ok) return res;
  const text = await res.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (res.ok) return data;
  const error = (data && data.error) || {};
  const failure = new ApiError(res.status, error.type, error.message || text || res.statusText, error.problems);
  if (res.status === 401 && key === undefined && session.onUnauthorized) session.onUnauthorized(failure.message);
  throw failure;
}

/** The team API (/api/members, /api/usage...). */
export const teamApi = (method, path, body) => request(method, new URL(path, TEAM_API), { body });

// ------------------------------------------------------------ formatting

const integer = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
const compact = new Intl.NumberFormat(undefined, { notation: "compact", maximumFractionDigits: 1 });

export const fmtInt = (n) => integer.format(n || 0);
export const fmtCompact = (n) => compact.format(n || 0);

/** USD: cents for ordinary amounts, two significant digits for the tiny ones tokens cost. */
export function fmtUsd(n) {
  const v = Number(n) || 0;
  if (v === 0) return "$0.00";
  if (Math.abs(v) < 0.01) return `$${Number(v.toPrecision(2))}`;
  return `$${v.toLocaleString(undefined, { minimumFractionDigits: 2, maximumFractionDigits: 2 })}`;
}

/** Every token the upstream reported, the way token budgets count them. */
export function tokensOf(row) {
  return (row.input_tokens || 0) + (row.output_tokens || 0) + (row.cache_write_5m || 0) +
    (row.cache_write_1h || 0) + (row.cache_read || 0);
}

/** "3 min ago" for an epoch-seconds time, with the absolute time (local and UTC) for a title. */
export function relativeTime(epoch, now = Date.now() / 1000) {
  const date = new Date(epoch * 1000);
  const absolute = `${date.toLocaleString()} (${date.toISOString().replace("T", " ").slice(0, 19)} UTC)`;
  const s = Math.max(0, Math.round(now - epoch));
  let text;
  if (s < 10) text = "just now";
  else if (s < 60) text = `${s} s ago`;
  else if (s < 3600) text = `${Math.floor(s / 60)} min ago`;
  else if (s < 86400) text = `${Math.floor(s / 3600)} h ago`;
  else if (s < 86400 * 60) text = `${Math.floor(s / 86400)} d ago`;
  else text = date.toLocaleDateString();
  return { text, absolute, iso: date.toISOString() };
}

export function timeHtml(epoch, never = "never") {
  if (epoch == null) return `<span class="muted">${esc(never)}</span>`;
  const t = relativeTime(epoch);
  return `<time datetime="${esc(t.iso)}" title="${esc(t.absolute)}">${esc(t.text)}</time>`;
}

// ------------------------------------------------------------ copying

/** Copy `text`; falls back to a temporary selection (removed at once) where the API is refused. */
export async function copyText(text, focusBack) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    const area = Object.assign(document.createElement("textarea"), { value: text, readOnly: true });
    area.className = "offscreen";
    (focusBack?.closest("dialog") || document.body).append(area);
    area.select();
    let ok = false;
    try {
      ok = document.execCommand("copy");
    } catch {
      ok = false;
    }
    area.value = "";
    area.remove();
    focusBack?.focus();
    return ok;
  }
}

// ------------------------------------------------------------ confirmation

/** The one confirmation dialog: resolves true when the action button was chosen. */
export function confirmAction({ title, text, action, danger = true }) {
  const dialog = $("confirm-dialog");
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  const button = $("confirm-ok");
  button.textContent = action;
  button.className = danger ? "danger" : "primary";
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "confirm"), { once: true });
  });
}

/** "field: message" errors of the team API ("limits.rpm: must be...") split for the form. */
export function splitFieldError(message) {
  const m = /^([A-Za-z]+(?:\.[A-Za-z0-9]+)?): (.*)$/s.exec(message || "");
  return m ? { field: m[1], message: m[2] } : { field: null, message };
}

/** Remove a form's field errors (and their aria links) and hide its summary box. */
export function clearFormErrors(form, summary) {
  form.querySelectorAll(".field-error.dyn").forEach((p) => p.remove());
  form.querySelectorAll("[aria-invalid]").forEach((el) => el.removeAttribute("aria-invalid"));
  form.querySelectorAll("[data-error-id]").forEach((el) => {
    const ids = (el.getAttribute("aria-describedby") || "").split(" ").filter((id) => id !== el.dataset.errorId);
    if (ids.length) el.setAttribute("aria-describedby", ids.join(" "));
    else el.removeAttribute("aria-describedby");
    delete el.dataset.errorId;
  });
  summary.hidden = true;
}
