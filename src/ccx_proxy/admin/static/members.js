// The Members page: who may call the gateway with their own key, under which limits.
// Admin API: /api/members (list, add), /api/members/{name} (PATCH, DELETE), .../rotate.
// A key exists in clear only in the add and rotate responses: it is shown once in the key
// dialog and wiped from the page (and from this module) when that dialog closes.

import {
  $, GATEWAY_ROOT, announce, code, confirmAction, copyText, esc, fmtCompact, fmtInt, fmtUsd, lines, nextId,
  clearFormErrors, request, session, splitFieldError, teamApi, timeHtml,
} from "./core.js";

const REFRESH_MS = 5000;
const LIMITS = [
  { name: "rpm", label: "requests per minute", integer: true, short: (v) => `${fmtInt(v)} rpm` },
  { name: "maxConcurrent", label: "max concurrent", integer: true, short: (v) => `${fmtInt(v)} concurrent` },
  { name: "dailyTokens", label: "daily tokens", integer: true, short: (v) => `${fmtCompact(v)} tokens/day` },
  { name: "monthlyTokens", label: "monthly tokens", integer: true, short: (v) => `${fmtCompact(v)} tokens/month` },
  { name: "dailyUsd", label: "daily USD", integer: false, short: (v) => `${fmtUsd(v)}/day` },
  { name: "monthlyUsd", label: "monthly USD", integer: false, short: (v) => `${fmtUsd(v)}/month` },
];

const state = {
  members: [],
  meta: {},
  json: "",
  channels: [], // channel names, for the form's checkboxes
  editing: null, // the member whose limits are being edited (null: adding)
  opener: null,
  busy: 0,
  loaded: false,
};

const visible = () => !$("members-view").hidden;
const memberPath = (name, suffix = "") => `members/${encodeURIComponent(name)}${suffix}`;

function setStatus(text, isError = false) {
  const line = $("members-status");
  line.textContent = text;
  line.classList.toggle("error-text", isError);
}

function showError(text) {
  const box = $("members-error");
  box.textContent = text;
  box.hidden = !text;
}

// ------------------------------------------------------------ list

export async function show() {
  await load();
}

async function load(quiet = false) {
  let data;
  try {
    data = await teamApi("GET", "members");
  } catch (err) {
    if (err.status === 401) return;
    showError(`Could not load the members: ${err.message}`);
    return;
  }
  if (!quiet) showError("");
  $("members-updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  state.meta = {
    allowSharedKey: data.allowSharedKey, database: data.database, databaseOpen: data.databaseOpen,
    usageRecording: data.usageRecording,
  };
  const json = JSON.stringify(data);
  if (quiet && json === state.json) return;
  state.json = json;
  state.members = data.members || [];
  state.loaded = true;
  renderFacts();
  renderTable();
}

function renderFacts() {
  const { allowSharedKey, database, databaseOpen, usageRecording } = state.meta;
  const facts = [];
  if (database && databaseOpen === false) {
    facts.push(`<strong class="error-text">The database ${esc(database)} is unavailable</strong>: members cannot ` +
      "be listed or changed; see the gateway's log.");
  } else if (database) facts.push(`Database: <span class="mono">${esc(database)}</span>.`);
  else facts.push(`<strong class="error-text">No database</strong>: members and usage need one (set DATA_DIR).`);
  facts.push(allowSharedKey
    ? "The shared <code>PROXY_ACCESS_KEY</code> still works too (its requests count as <code>shared</code>)."
    : "Only member keys are accepted: the shared <code>PROXY_ACCESS_KEY</code> is refused.");
  if (usageRecording === false) facts.push(`<span class="warn-text">Usage recording is off.</span>`);
  $("members-facts").innerHTML = facts.join(" ");
}

function limitsHtml(m) {
  const set = LIMITS.filter((l) => m.limits && m.limits[l.name] != null);
  if (!set.length) return `<span class="muted">no limits</span>`;
  return `<ul class="plain">${set.map((l) => `<li>${esc(l.short(m.limits[l.name]))}</li>`).join("")}</ul>`;
}

function accessHtml(m) {
  const models = m.models || [];
  const channels = m.channels || [];
  if (!models.length && !channels.length) return `<span class="muted">all models, all channels</span>`;
  return `<div>${models.length ? `models: ${models.map(code).join(" ")}` : `<span class="muted">all models</span>`}</div>` +
    `<div>${channels.length ? `channels: ${channels.map(code).join(" ")}` : `<span class="muted">all channels</span>`}</div>`;
}

function todayHtml(m) {
  const today = m.today || { tokens: 0, usd: 0 };
  const of = (limit, fmt) => (limit != null ? ` <span class="muted">/ ${fmt(limit)}</span>` : "");
  return `<span title="${esc(fmtInt(today.tokens))} tokens">${esc(fmtCompact(today.tokens))} tokens</span>` +
    `${of(m.limits?.dailyTokens, fmtCompact)}<span class="sub">${esc(fmtUsd(today.usd))}${of(m.limits?.dailyUsd, fmtUsd)}</span>`;
}

function rowHtml(m) {
  const name = esc(m.name);
  const revoked = m.status !== "active";
  const toggle = revoked ? "Re-activate" : "Revoke";
  return `<tr data-name="${name}" class="${revoked ? "inactive" : ""}">
    <th scope="row"><span class="name">${name}</span><span class="sub">added ${timeHtml(m.createdAt)}</span></th>
    <td data-label="Status"><span class="badge status-${revoked ? "revoked" : "active"}">${esc(m.status)}</span></td>
    <td data-label="Key"><code class="key-prefix">${esc(m.keyPrefix)}</code></td>
    <td data-label="Limits" class="limits">${limitsHtml(m)}</td>
    <td data-label="Access" class="access">${accessHtml(m)}</td>
    <td data-label="Last used" class="last-used">${timeHtml(m.lastUsedAt)}</td>
    <td data-label="Today" class="num today">${todayHtml(m)}</td>
    <td data-label="Active" class="num active-count">${esc(fmtInt(m.active))}</td>
    <td data-label="Actions" class="actions"><div class="btns">
      <button type="button" data-action="edit" aria-label="Edit limits of ${name}">Edit limits</button>
      <button type="button" data-action="rotate" aria-label="Rotate the key of ${name}">Rotate key</button>
    </div><div class="btns">
      <button type="button" data-action="toggle" aria-label="${toggle} ${name}">${toggle}</button>
      <button type="button" data-action="delete" class="danger-text" aria-label="Delete ${name}">Delete</button>
    </div></td>
  </tr>`;
}

function renderTable() {
  const body = $("member-rows");
  const active = document.activeElement;
  const focus = active && body.contains(active) && active.dataset.action
    ? { name: active.closest("tr").dataset.name, action: active.dataset.action } : null;
  body.innerHTML = state.members.length
    ? state.members.map(rowHtml).join("")
    : `<tr><td colspan="9" class="empty">No members yet. Add one to give someone their own key, limits and usage.</td></tr>`;
  if (focus) focusRowButton(focus.name, focus.action);
}

function focusRowButton(name, action) {
  const row = [...$("member-rows").querySelectorAll("tr")].find((r) => r.dataset.name === name);
  const button = row && (row.querySelector(`[data-action="${action}"]`) || row.querySelector('[data-action="edit"]'));
  if (button) button.focus();
  return Boolean(button);
}

/** A row action: on failure the page's error box says what and why. */
async function rowWrite(label, write, done) {
  state.busy += 1;
  try {
    const result = await write();
    showError("");
    setStatus(typeof done === "function" ? done(result) : done);
    return result;
  } catch (err) {
    if (err.status !== 401) {
      showError(`${label} failed: ${err.message}`);
      setStatus(`${label} failed.`, true);
    }
    return null;
  } finally {
    state.busy -= 1;
    await load();
  }
}

async function onTableClick(event) {
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  const name = button.closest("tr").dataset.name;
  const member = state.members.find((m) => m.name === name);
  if (!member) return;
  const action = button.dataset.action;
  if (action === "edit") {
    openForm(member, button);
  } else if (action === "rotate") {
    const ok = await confirmAction({
      title: "Rotate key?",
      text: `${name}'s current key (${member.keyPrefix}) stops working within a second; the new key is ` +
        "shown once.",
      action: "Rotate key",
    });
    if (!ok) {
      focusRowButton(name, "rotate");
      return;
    }
    const result = await rowWrite(`Rotating ${name}'s key`, () => teamApi("POST", memberPath(name, "/rotate")),
      `Rotated ${name}'s key.`);
    if (result) showKey(result.member.name, result.key, "rotated", button);
    else focusRowButton(name, "rotate");
  } else if (action === "toggle") {
    const status = member.status === "active" ? "revoked" : "active";
    await rowWrite(`${status === "active" ? "Re-activating" : "Revoking"} ${name}`,
      () => teamApi("PATCH", memberPath(name), { status }),
      status === "active" ? `${name} is active again: their key works.` : `Revoked ${name}: their key is refused.`);
    focusRowButton(name, "toggle");
  } else if (action === "delete") {
    const ok = await confirmAction({
      title: "Delete member?",
      text: `${name} is removed and their key stops working. Their usage stays in the reports, under ` +
        "their name.",
      action: "Delete",
    });
    if (!ok) {
      focusRowButton(name, "delete");
      return;
    }
    await rowWrite(`Deleting ${name}`, () => teamApi("DELETE", memberPath(name)), `Deleted member ${name}.`);
    if (!focusRowButton(name, "delete")) $("add-member").focus();
  }
}

// ------------------------------------------------------------ the form

async function loadChannelNames() {
  try {
    const data = await request("GET", new URL("../api/messages/channels", location.href));
    state.channels = (data.channels || []).map((c) => c.name).filter(Boolean);
  } catch {
    // The form still works: the member's own channels are listed.
  }
}

function renderChannelChecks(selected) {
  const names = [...new Set([...state.channels, ...selected])];
  $("m-channels").innerHTML = names.length
    ? names.map((n) => {
      const id = nextId("m-ch");
      return `<label class="inline-check" for="${id}"><input type="checkbox" id="${id}" value="${esc(n)}"` +
        `${selected.includes(n) ? " checked" : ""}> <span class="mono">${esc(n)}</span></label>`;
    }).join("")
    : `<span class="muted">No channels.</span>`;
}

async function openForm(member, opener) {
  state.editing = member ? structuredClone(member) : null;
  state.opener = opener;
  const form = $("member-form");
  form.reset();
  clearErrors();
  $("member-form-title").textContent = member ? `Edit limits of ${member.name}` : "Add member";
  $("save-member").textContent = member ? "Save" : "Add member";
  $("m-name-field").hidden = Boolean(member);
  for (const l of LIMITS) $(`m-${l.name}`).value = member?.limits?.[l.name] ?? "";
  $("m-models").value = (member?.models || []).join("\n");
  renderChannelChecks(member?.channels || []);
  $("member-dialog").showModal();
  (member ? $("m-rpm") : $("m-name")).focus();
  await loadChannelNames();
  if ($("member-dialog").open) {
    const ticked = [...$("m-channels").querySelectorAll("input:checked")].map((i) => i.value);
    const focused = document.activeElement?.closest("#m-channels") ? document.activeElement.value : null;
    renderChannelChecks(ticked);
    if (focused) $("m-channels").querySelector(`input[value="${CSS.escape(focused)}"]`)?.focus();
  }
}

/** The body to send, and the problems found before sending it. */
function collect() {
  const errors = [];
  const limits = {};
  for (const l of LIMITS) {
    const input = $(`m-${l.name}`);
    const raw = input.value.trim();
    if (input.validity.badInput) {
      errors.push({ field: `limits.${l.name}`, message: "enter a number, or leave it empty for no limit" });
      continue;
    }
    if (raw === "") {
      if (state.editing) limits[l.name] = null; // PATCH merges: null clears the limit
      continue;
    }
    const value = Number(raw);
    if (!(value >= 0) || (l.integer && !Number.isInteger(value))) {
      errors.push({ field: `limits.${l.name}`,
        message: l.integer ? "a whole number, 0 or more" : "an amount in USD, 0 or more" });
      continue;
    }
    limits[l.name] = value;
  }
  const body = {
    limits,
    models: lines($("m-models").value),
    channels: [...$("m-channels").querySelectorAll("input:checked")].map((i) => i.value),
  };
  if (!state.editing) {
    body.name = $("m-name").value.trim();
    if (!body.name) errors.push({ field: "name", message: "enter a name" });
  }
  return { body, errors };
}

function fieldTarget(field) {
  return field ? $("member-form").querySelector(`[data-field="${CSS.escape(field)}"]`) : null;
}

function clearErrors() {
  clearFormErrors($("member-form"), $("member-errors"));
}

function showErrors(problems, heading) {
  clearErrors();
  const items = [];
  for (const p of problems) {
    items.push(`<li>${p.field ? `<strong>${esc(p.field)}</strong>: ` : ""}${esc(p.message)}</li>`);
    const target = fieldTarget(p.field);
    if (!target) continue;
    const id = nextId("m-err");
    target.append(Object.assign(document.createElement("p"), { id, className: "field-error dyn", textContent: p.message }));
    for (const el of target.querySelectorAll("input, textarea")) {
      if (el.type === "checkbox") continue;
      el.setAttribute("aria-invalid", "true");
      el.setAttribute("aria-describedby", `${el.getAttribute("aria-describedby") || ""} ${id}`.trim());
      el.dataset.errorId = id;
    }
  }
  const box = $("member-errors");
  box.innerHTML = `<p><strong>${esc(heading)}</strong></p><ul>${items.join("")}</ul>`;
  box.hidden = false;
  box.focus();
}

async function submitForm(event) {
  event.preventDefault();
  const { body, errors } = collect();
  const editing = state.editing;
  const heading = editing ? `${editing.name}'s limits were not saved` : "The member was not added";
  if (errors.length) {
    showErrors(errors, heading);
    return;
  }
  clearErrors();
  const save = $("save-member");
  save.disabled = true;
  state.busy += 1;
  try {
    if (editing) {
      await teamApi("PATCH", memberPath(editing.name), body);
      state.opener = null;
      $("member-dialog").close();
      setStatus(`Saved ${editing.name}'s limits.`);
      await load();
      focusRowButton(editing.name, "edit");
    } else {
      const created = await teamApi("POST", "members", body);
      state.opener = null;
      $("member-dialog").close();
      setStatus(`Added member ${created.member.name}.`);
      await load();
      showKey(created.member.name, created.key, "added", $("add-member"));
    }
  } catch (err) {
    if (err.status === 401) return;
    const split = err.status === 409 && !editing ? { field: "name", message: err.message }
      : splitFieldError(err.message);
    showErrors([fieldTarget(split.field) ? split : { field: null, message: err.message }], heading);
  } finally {
    state.busy -= 1;
    save.disabled = false;
  }
}

function onFormInput(event) {
  const el = event.target.closest("input, textarea");
  const id = el && el.dataset.errorId;
  if (!id) return;
  el.removeAttribute("aria-invalid");
  const ids = (el.getAttribute("aria-describedby") || "").split(" ").filter((x) => x !== id);
  if (ids.length) el.setAttribute("aria-describedby", ids.join(" "));
  else el.removeAttribute("aria-describedby");
  delete el.dataset.errorId;
  $(id)?.remove();
  if (!$("member-form").querySelector(".field-error.dyn")) $("member-errors").hidden = true;
}

// ------------------------------------------------------------ the key, once

const keyState = { name: null, returnTo: null };

/** Show a fresh key. It lives only in this dialog's text until the dialog closes. */
function showKey(name, key, how, returnTo) {
  keyState.name = name;
  keyState.returnTo = returnTo;
  $("key-title").textContent = how === "rotated" ? `New key for ${name}` : `Key for ${name}`;
  $("key-value").textContent = key;
  $("key-exports").textContent = `export ANTHROPIC_BASE_URL="${GATEWAY_ROOT}"\nexport ANTHROPIC_API_KEY="${key}"`;
  $("key-dialog").showModal();
  $("copy-key").focus();
  announce(`${how === "rotated" ? "Rotated" : "Added"} ${name}. The key is shown once: copy it now.`);
}

async function copyFrom(source, button, what) {
  const ok = await copyText($(source).textContent, button);
  const label = button.textContent;
  button.textContent = ok ? "Copied" : "Copy failed";
  announce(ok ? `Copied ${what}.` : `Copying failed: select the ${what} and copy it yourself.`);
  if (!ok) getSelection().selectAllChildren($(source));
  setTimeout(() => { button.textContent = label; }, 2000);
}

/** Clear the key from the page. Run as the dialog closes (Done, Escape) and again on its
 * "close" event, which comes a task later (and also follows a sign-out). */
function wipeKey() {
  $("key-value").textContent = "";
  $("key-exports").textContent = "";
  $("copy-key").textContent = "Copy key";
  $("copy-key-exports").textContent = "Copy export lines";
  const selection = getSelection();
  if (selection && $("key-dialog").contains(selection.anchorNode)) selection.removeAllRanges();
}

/** Signing out: nothing of a key stays on the page. */
export function forget() {
  wipeKey();
  state.members = [];
  state.json = "";
}

function keyClosed() {
  wipeKey();
  const name = keyState.name;
  const back = keyState.returnTo;
  keyState.name = null;
  keyState.returnTo = null;
  if (!session.key) return;
  if (back && back.isConnected) back.focus();
  else if (!(name && focusRowButton(name, "rotate"))) $("add-member").focus();
}

// ------------------------------------------------------------ wiring

export function init() {
  $("members-refresh").addEventListener("click", async () => {
    await load();
    setStatus("Reloaded the members.");
  });
  $("add-member").addEventListener("click", (event) => openForm(null, event.currentTarget));
  $("member-rows").addEventListener("click", onTableClick);
  const dialog = $("member-dialog");
  $("member-form").addEventListener("submit", submitForm);
  $("member-form").addEventListener("input", onFormInput);
  dialog.querySelectorAll("[data-close]").forEach((b) => b.addEventListener("click", () => dialog.close()));
  dialog.addEventListener("close", () => {
    if (state.opener && state.opener.isConnected) state.opener.focus();
    state.opener = null;
  });
  $("copy-key").addEventListener("click", (e) => copyFrom("key-value", e.currentTarget, "the key"));
  $("copy-key-exports").addEventListener("click", (e) => copyFrom("key-exports", e.currentTarget, "the export lines"));
  $("key-done").addEventListener("click", () => {
    wipeKey();
    $("key-dialog").close();
  });
  $("key-dialog").addEventListener("cancel", wipeKey);
  $("key-dialog").addEventListener("close", keyClosed);
  setInterval(() => {
    if (session.key && visible() && !state.busy && !document.hidden && !document.querySelector("dialog[open]")) {
      load(true);
    }
  }, REFRESH_MS);
}
