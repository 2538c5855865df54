// The fromface web page: three forms over the service's own POST /verify, /identify and /enroll.
// Plain browser JavaScript, no libraries, nothing fetched from elsewhere. Everything the service returns is put on
// the page as text (textContent), never as HTML, so a name or file name cannot inject markup.
"use strict";

const TOKEN_KEY = "fromface-token"; // sessionStorage: forgotten when the tab closes
const TABS = ["verify", "identify", "enrol"];
const service = { limits: null, gallery: undefined };

const $ = (id) => document.getElementById(id);

/** An element with text and classes; children appended in order. */
function el(tag, opts = {}, ...children) {
  const node = document.createElement(tag);
  if (opts.cls) node.className = opts.cls;
  if (opts.text !== undefined) node.textContent = opts.text;
  for (const [k, v] of Object.entries(opts.attrs || {})) node.setAttribute(k, v);
  for (const child of children) if (child) node.append(child);
  return node;
}

function megabytes(bytes) {
  const mb = bytes / (1024 * 1024);
  return mb >= 10 ? `${Math.round(mb)} MB` : `${mb.toFixed(mb >= 1 ? 1 : 2)} MB`;
}

/** "1 template", "3 templates"; `many` for irregular plurals. */
function count(n, one, many = `${one}s`) {
  return `${n} ${n === 1 ? one : many}`;
}

function percent(x) {
  return `${Math.round(x * 100)}%`;
}

// ------------------------------------------------------------------------------------------------ talking to the API

class ApiError extends Error {}

function authHeaders() {
  const token = $("token").value.trim();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

/** Why a request failed, in one line a person can act on. */
function explain(status, body) {
  const detail = (body && body.detail) || `the service answered ${status}`;
  if (status === 401) {
    return `${detail}. Type the service's token in the Token field at the top of the page.`;
  }
  if (status === 413) return `Too large: ${detail}.`;
  return detail;
}

/** POST a form to the service; the parsed JSON, or an ApiError carrying the service's own detail. */
async function post(path, form) {
  let resp;
  try {
    resp = await fetch(path, { method: "POST", body: form, headers: authHeaders(), credentials: "same-origin" });
  } catch (err) {
    // A body over the service's limit is refused and the connection closed before the upload ends.
    const limit = service.limits ? ` (the service accepts files up to ${megabytes(service.limits.max_upload_bytes)})`
      : "";
    throw new ApiError(`The service did not answer: it stopped, or the upload was too large${limit}.`);
  }
  let body = null;
  try {
    body = await resp.json();
  } catch (err) {
    body = null;
  }
  if (!resp.ok) throw new ApiError(explain(resp.status, body));
  if (body === null) throw new ApiError(`the service answered ${resp.status} without JSON`);
  return body;
}

/** Refuse, before uploading, files the service would refuse for their size or number. */
function checkFiles(files) {
  if (files.length === 0) throw new ApiError("Pick a photo first.");
  const limits = service.limits;
  if (!limits) return;
  if (limits.max_files && files.length > limits.max_files) {
    throw new ApiError(`${files.length} photos at once is over the service's limit of ${limits.max_files}.`);
  }
  for (const f of files) {
    if (f.size === 0) throw new ApiError(`${f.name} is empty.`);
    if (f.size > limits.max_upload_bytes) {
      throw new ApiError(`Too large: ${f.name} is ${megabytes(f.size)}; the service accepts files up to ` +
        `${megabytes(limits.max_upload_bytes)}.`);
    }
  }
}

async function loadHealth() {
  try {
    const resp = await fetch("health", { credentials: "same-origin" });
    const h = await resp.json();
    service.limits = { max_upload_bytes: h.max_upload_bytes, max_pixels: h.max_pixels, max_files: h.max_files };
    service.gallery = h.gallery;
    showService(h);
  } catch (err) {
    $("service").textContent = "The service does not answer; is `fromface serve` running?";
  }
}

function showService(h) {
  const parts = [`model ${h.model}`];
  if (h.gallery) {
    parts.push(`gallery ${h.gallery.name}: ${count(h.gallery.identities, "identity", "identities")}, ` +
      count(h.gallery.templates, "template"));
  } else {
    parts.push("no gallery");
  }
  parts.push(`photos up to ${megabytes(h.max_upload_bytes)}`);
  $("service").textContent = parts.join(" · ");
  for (const note of document.querySelectorAll("[data-needs-gallery]")) {
    note.hidden = Boolean(h.gallery);
    note.textContent = "This service has no gallery: start it with `fromface serve --db gallery.db` to identify " +
      "and enrol people.";
  }
}

// ------------------------------------------------------------------------------------------------ page furniture

function showTab(name) {
  if (!TABS.includes(name)) name = "verify";
  for (const tab of TABS) {
    const on = tab === name;
    $(`tab-${tab}`).setAttribute("aria-selected", String(on));
    $(`panel-${tab}`).hidden = !on;
  }
}

function setError(prefix, message) {
  const box = $(`${prefix}-error`);
  box.textContent = message || "";
  box.hidden = !message;
}

/** Run one form's request: busy button, error line cleared or filled, result area replaced. */
async function submit(prefix, work) {
  const button = $(`${prefix}-go`);
  const result = $(`${prefix}-result`);
  setError(prefix, "");
  result.replaceChildren(el("p", { cls: "muted", text: "Working…" }));
  button.disabled = true;
  try {
    result.replaceChildren(...(await work()));
  } catch (err) {
    result.replaceChildren();
    setError(prefix, err instanceof ApiError ? err.message : `Something went wrong in the page: ${err}`);
  } finally {
    button.disabled = false;
  }
}

/** A drop zone around a file input: files dropped on it or picked with it, shown as previews or names. */
function dropZone(zoneId, inputId, onFiles) {
  const zone = $(zoneId);
  const input = $(inputId);
  const state = { files: [] };
  const take = (files) => {
    state.files = Array.from(files);
    onFiles(zone, state.files);
  };
  input.addEventListener("change", () => take(input.files));
  zone.addEventListener("dragover", (ev) => {
    ev.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (ev) => {
    ev.preventDefault();
    zone.classList.remove("over");
    if (ev.dataTransfer && ev.dataTransfer.files.length) take(ev.dataTransfer.files);
  });
  return state;
}

function preview(zone, files) {
  const img = zone.querySelector(".preview");
  const hint = zone.querySelector(".hint");
  if (img.src) URL.revokeObjectURL(img.src);
  img.removeAttribute("src");
  img.hidden = true;
  if (!files.length) return;
  hint.textContent = files[0].name;
  if (files[0].type.startsWith("image/")) { // anything else is sent as it is, and the service says what is wrong
    img.src = URL.createObjectURL(files[0]);
    img.hidden = false;
  }
}

function listNames(zone, files) {
  zone.querySelector(".files").textContent = files.map((f) => f.name).join(", ");
}

// ------------------------------------------------------------------------------------------------ showing faces

/** What the model saw of one face, as the `--show` caption says it. */
function occlusionLine(face) {
  if (face.visible_fraction === null || face.visible_fraction === undefined) {
    return `${face.method}, no occlusion estimate`;
  }
  const state = face.occluded ? "occluded" : "clean";
  const p = face.pattern_probability === null ? "" : ` (p=${face.pattern_probability.toFixed(2)})`;
  return `${state}: pattern ${face.pattern}${p}, visible ${percent(face.visible_fraction)}`;
}

function faceFigure(face, label) {
  const fig = el("figure", { cls: "face" });
  if (face.panel) {
    fig.append(el("img", { attrs: { src: face.panel, alt: `${label}: aligned face with its occlusion overlay`,
      width: "224", height: "224" } }));
  }
  const caption = el("figcaption");
  caption.append(el("strong", { text: `${label}: ${face.source}` }));
  caption.append(el("span", { cls: "occlusion", text: occlusionLine(face) }));
  const report = face.occlusion_report;
  if (report && report.summary) caption.append(el("span", { cls: "report", text: report.summary }));
  if (face.faces_found > 1) {
    caption.append(el("span", { cls: "note",
      text: `${face.faces_found} faces in this photo; the ${face.selected} one was used.` }));
  }
  if (face.method === "fallback") {
    caption.append(el("span", { cls: "note", text: "No face detected: the centre of the photo was used." }));
  }
  fig.append(caption);
  return fig;
}

/** How to read the face pictures; nothing for plain models, which have no occlusion estimate to draw. */
function legend(faces) {
  if (!faces.some((f) => f.panel && f.heatmap)) return null;
  return el("p", { cls: "legend muted",
    text: "Red: features the model masked as occluded. Yellow box: the occlusion pattern it predicted." });
}

function facts(pairs) {
  const dl = el("dl", { cls: "facts" });
  for (const [term, value] of pairs) dl.append(el("dt", { text: term }), el("dd", { text: value }));
  return dl;
}

const fixed = (x) => (x === null || x === undefined ? "–" : x.toFixed(3));

// ------------------------------------------------------------------------------------------------ the three tabs

function renderVerify(v) {
  const verdict = el("p", { cls: `verdict ${v.same ? "same" : "different"}`,
    text: v.same ? "Same person" : "Different people", attrs: { id: "verify-verdict" } });
  const numbers = facts([["score", fixed(v.score)], ["threshold", fixed(v.threshold)], ["condition", v.condition],
    ["threshold from", v.reason]]);
  const faces = el("div", { cls: "faces" }, faceFigure(v.faces[0], "A"), faceFigure(v.faces[1], "B"),
    legend(v.faces));
  return [verdict, numbers, faces];
}

function templateState(occluded) {
  if (occluded === null || occluded === undefined) return "no estimate";
  return occluded ? "occluded" : "clean";
}

function renderIdentify(r) {
  const best = r.matches.find((m) => m.same);
  const verdict = best
    ? el("p", { cls: "verdict same", text: `Best match: ${best.name}`, attrs: { id: "identify-verdict" } })
    : el("p", { cls: "verdict different", text: "Unknown: no enrolled person passes the threshold",
      attrs: { id: "identify-verdict" } });
  const table = el("table", { cls: "matches", attrs: { id: "identify-matches" } });
  const head = el("tr");
  for (const h of ["name", "score", "threshold", "condition", "verdict", "enrolled face"]) head.append(el("th", { text: h }));
  table.append(el("thead", {}, head));
  const body = el("tbody");
  for (const m of r.matches) {
    const row = el("tr", { cls: m.same ? "pass" : "fail" });
    for (const cell of [m.name, fixed(m.score), fixed(m.threshold), m.condition || "–",
      m.same ? "match" : "below threshold", templateState(m.template_occluded)]) {
      row.append(el("td", { text: cell }));
    }
    body.append(row);
  }
  table.append(body);
  const empty = r.matches.length ? null : el("p", { cls: "muted", text: "The gallery is empty: enrol someone first." });
  const faces = el("div", { cls: "faces" }, faceFigure(r.face, "Photo"), legend([r.face]));
  return [verdict, el("div", { cls: "side-by-side" }, faces, empty || table)];
}

function renderEnrol(e) {
  const what = e.added
    ? `Added ${count(e.added, "photo")} to ${e.name}; ${e.name} now has ${count(e.templates, "template")}.`
    : `Nothing added to ${e.name}; ${e.name} has ${count(e.templates, "template")}.`;
  const out = [el("p", { cls: `verdict ${e.added ? "same" : "different"}`, text: what, attrs: { id: "enrol-verdict" } })];
  if (e.skipped.length) {
    out.push(el("p", { text: `Skipped ${e.skipped.length}:` }));
    const list = el("ul", { cls: "skipped", attrs: { id: "enrol-skipped" } });
    for (const line of e.skipped) list.append(el("li", { text: line }));
    out.push(list);
  }
  return out;
}

function wire() {
  const a = dropZone("drop-a", "verify-a", preview);
  const b = dropZone("drop-b", "verify-b", preview);
  const probe = dropZone("drop-probe", "identify-image", preview);
  const photos = dropZone("drop-enrol", "enrol-images", listNames);

  $("verify-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    submit("verify", async () => {
      if (!a.files.length || !b.files.length) throw new ApiError("Pick two photos: one for A and one for B.");
      checkFiles([a.files[0], b.files[0]]);
      const form = new FormData();
      form.append("a", a.files[0]);
      form.append("b", b.files[0]);
      form.append("show", "true");
      return renderVerify(await post("verify", form));
    });
  });
  $("identify-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    submit("identify", async () => {
      checkFiles(probe.files.slice(0, 1));
      const form = new FormData();
      form.append("image", probe.files[0]);
      form.append("top_k", $("identify-top-k").value || "5");
      form.append("show", "true");
      return renderIdentify(await post("identify", form));
    });
  });
  $("enrol-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    submit("enrol", async () => {
      const name = $("enrol-name").value.trim();
      if (!name) throw new ApiError("Type the person's name.");
      checkFiles(photos.files);
      const form = new FormData();
      form.append("name", name);
      for (const f of photos.files) form.append("images", f);
      form.append("mode", $("enrol-add").checked ? "add" : "new");
      const result = renderEnrol(await post("enroll", form));
      loadHealth(); // the gallery's counts changed
      return result;
    });
  });

  const token = $("token");
  token.value = sessionStorage.getItem(TOKEN_KEY) || "";
  token.addEventListener("input", () => sessionStorage.setItem(TOKEN_KEY, token.value.trim()));

  for (const tab of TABS) {
    $(`tab-${tab}`).addEventListener("click", () => {
      history.replaceState(null, "", `#${tab}`); // a link or a reload opens the same tab
      showTab(tab);
    });
  }
  window.addEventListener("hashchange", () => showTab(location.hash.slice(1)));
  showTab(location.hash.slice(1));
}

document.addEventListener("DOMContentLoaded", () => {
  wire();
  loadHealth();
});
