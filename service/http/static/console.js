// The MetaLoRA Serve console: plain JavaScript over the service's own /v1 API (no build step, no CDN).
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const state = { files: [], adapters: [], labels: {}, lastRun: null };
const ITEM_ID = /^(?=.{1,128}$)[A-Za-z0-9][A-Za-z0-9._:-]*(\/[A-Za-z0-9_:-][A-Za-z0-9._:-]*)*$/;  // the API's gallery item id (service/schemas.py ItemId)

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) e.append(c);
  return e;
}

const token = () => $("#token").value.trim();

// Every call goes through here: a non-2xx answer becomes an Error carrying the server's code and message.
async function api(method, path, body, { admin = false } = {}) {
  const headers = {};
  if (admin) headers["Authorization"] = "Bearer " + token();
  let payload = body;
  if (body && !(body instanceof FormData)) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  const resp = await fetch(path, { method, headers, body: payload });
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { /* not JSON */ }
  if (!resp.ok) {
    const err = data && data.error ? data.error : { code: "http_" + resp.status, message: text || resp.statusText };
    const e = new Error(`${err.code}: ${err.message}`);
    e.code = err.code;
    throw e;
  }
  return data;
}

function showError(e, where = $("#error")) {
  where.hidden = false;
  where.textContent = e.message || String(e);
}
function clearError(where = $("#error")) { where.hidden = true; where.textContent = ""; }
const status = (msg) => { $("#status").textContent = msg; };

// ---------------------------------------------------------------- adapters
async function loadAdapters() {
  const box = $("#adapters");
  try {
    const list = await api("GET", "/v1/adapters");
    const checked = new Set(selectedAdapters());
    if (!checked.size) { checked.add("base"); if (list.adapters[0]) checked.add(list.adapters[0].name); }
    state.adapters = list.adapters;
    box.replaceChildren(el("legend", { text: "Adapters (one result per image × adapter)" }));
    box.append(adapterRow("base", checked.has("base"), "frozen backbone, ImageNet head", null));
    for (const a of list.adapters) {
      const tags = a.loaded.length ? `loaded ${a.loaded.map((v) => "v" + v).join(", ")}${a.pinned.length ? " (pinned)" : ""}` : "not loaded";
      box.append(adapterRow(a.name, checked.has(a.name), tags, a));
    }
  } catch (e) {
    box.replaceChildren(el("legend", { text: "Adapters" }), el("p", { class: "error", text: e.message }));
  }
}

function adapterRow(name, checked, tag, info) {
  const id = "ad-" + name;
  const row = el("span", { class: "adapter-row" },
    el("input", { type: "checkbox", id, value: name, name: "adapter", checked }),
    el("label", { for: id, text: name }),
    el("span", { class: "tag", text: tag }));
  if (info && token()) {
    const loaded = info.loaded.length > 0;
    const target = loaded ? `${name}@${info.loaded[info.loaded.length - 1]}` : name;  // unload what is loaded, not the latest
    row.append(el("button", {
      type: "button", class: "small", "aria-label": `${loaded ? "unload" : "load"} ${name}`,
      text: loaded ? "unload" : "load",
      onclick: () => adminAction(() => api("POST", `/v1/adapters/${encodeURIComponent(target)}/${loaded ? "unload" : "load"}`, null, { admin: true }),
        `${name} ${loaded ? "unloaded" : "loaded"}`),
    }));
  }
  return row;
}

const selectedAdapters = () => [...document.querySelectorAll("#adapters input[type=checkbox]:checked")].map((i) => i.value);

async function adminAction(fn, done) {
  clearError();
  try { await fn(); status(done); } catch (e) { showError(e); }
  await loadAdapters();
}

async function labelsOf(name, version) {
  const key = `${name}@${version}`;
  if (!state.labels[key]) {
    const info = await api("GET", `/v1/adapters/${encodeURIComponent(name)}`);
    const v = info.versions.find((x) => x.version === version) || info.versions[info.versions.length - 1];
    state.labels[key] = (v && v.labels) || [];
  }
  return state.labels[key];
}

// ---------------------------------------------------------------- images in
function setFiles(files) {
  state.files = [...files].filter((f) => f.size > 0 || f.type);
  if (state.files.length) run();
}

function wireInput() {
  const drop = $("#drop"), input = $("#files");
  input.addEventListener("change", () => setFiles(input.files));
  drop.addEventListener("keydown", (ev) => {
    if (ev.target === drop && (ev.key === "Enter" || ev.key === " ")) { ev.preventDefault(); input.click(); }
  });
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => { ev.preventDefault(); drop.classList.remove("over"); setFiles(ev.dataTransfer.files); });
  $("#run").addEventListener("click", run);
  let typing = null;  // re-fetch once the token stops changing, not on every keystroke
  $("#token").addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => { loadAdapters(); if (state.lastRun) render(state.lastRun); }, 300);
  });
}

function form(files, adapters, extra) {
  const fd = new FormData();
  for (const f of files) fd.append("images", f, f.name || "image");
  for (const a of adapters) fd.append("adapter", a);
  for (const [k, v] of Object.entries(extra)) fd.append(k, String(v));
  return fd;
}

// ---------------------------------------------------------------- run: predict (+ seed) and k-NN
async function run() {
  clearError();
  const adapters = selectedAdapters();
  if (!state.files.length) return showError(new Error("pick or drop at least one image"));
  if (!adapters.length) return showError(new Error("choose at least one adapter"));
  const topK = Number($("#top-k").value) || 5, k = Number($("#k").value) || 8;
  status(`asking ${adapters.length} adapter(s) about ${state.files.length} image(s)…`);
  $("#run").disabled = true;
  try {
    const withGallery = adapters.filter((a) => a !== "base");
    const [pred, knn] = await Promise.all([
      api("POST", "/v1/predict", form(state.files, adapters, { top_k: topK, include_seed: true })),
      withGallery.length ? api("POST", "/v1/knn", form(state.files, withGallery, { k })).catch((e) => ({ error: e })) : null,
    ]);
    state.lastRun = { files: state.files, adapters, withGallery, pred, knn, k };
    render(state.lastRun);
    status(`${pred.results.length} answer(s)`);
  } catch (e) {
    showError(e);
    status("");
  } finally {
    $("#run").disabled = false;
  }
}

function render(r) {
  const out = $("#results");
  out.replaceChildren();
  const A = r.adapters.length, G = r.withGallery.length;
  r.files.forEach((file, i) => {
    const url = URL.createObjectURL(file);
    const answers = el("div", { class: "answers" });
    r.adapters.forEach((name, a) => {
      const res = r.pred.results[i * A + a];
      const g = r.withGallery.indexOf(name);
      const knnRes = g >= 0 && r.knn && !r.knn.error ? r.knn.results[i * G + g] : null;
      answers.append(answerPanel(file, i, res, knnRes, g >= 0 && r.knn && r.knn.error));
    });
    out.append(el("article", { class: "image-card", "aria-label": `image ${i + 1}: ${file.name}` },
      el("div", { class: "preview" }, el("img", { src: url, alt: file.name }), el("p", { text: file.name })),
      answers));
  });
}

function answerPanel(file, i, res, knnRes, knnError) {
  const title = res.version ? `${res.adapter}@${res.version}` : res.adapter;
  const panel = el("section", { class: "answer", "data-adapter": res.adapter, "aria-label": `${title} on ${file.name}` }, el("h3", { text: title }));
  if (res.unknown !== undefined && res.unknown !== null && res.unknown !== false) {
    panel.append(el("div", { class: "unknown", role: "note", text: "unknown: " + (typeof res.unknown === "object" ? JSON.stringify(res.unknown) : String(res.unknown)) }));
  }
  panel.append(bars(res.predictions));
  if (knnError) panel.append(el("p", { class: "error", text: knnError.message }));
  if (knnRes) panel.append(neighbours(res, knnRes));
  panel.append(seedChart(res.seed));
  if (res.adapter !== "base" && token()) panel.append(addForm(file, res));
  return panel;
}

function bars(preds) {
  const ul = el("ul", { class: "bars", "aria-label": "top labels" });
  for (const p of preds) {
    const pct = Math.max(0, Math.min(100, p.score * 100));
    ul.append(el("li", { class: "prediction" },
      el("span", { class: "name", title: p.label, text: p.label }),
      el("span", { class: "track", role: "meter", "aria-valuemin": "0", "aria-valuemax": "1", "aria-valuenow": p.score.toFixed(4), "aria-label": p.label },
        el("span", { class: "fill", style: `display:block;width:${pct.toFixed(1)}%` })),
      el("span", { class: "val", text: p.score.toFixed(3) })));
  }
  return ul;
}

function thumbUrl(adapter, version, id) {
  return `/v1/adapters/${encodeURIComponent(adapter + "@" + version)}/gallery/${encodeURIComponent(id)}/thumbnail`;
}

function neighbours(res, knnRes) {
  const wrap = el("div", { class: "knn" }, el("h3", { text: `neighbours (vote: ${knnRes.label ?? "—"})` }));
  const ul = el("ul", { class: "neighbours" });
  for (const n of knnRes.neighbors) {
    const fig = el("figure", { "data-id": n.id, class: n.id === state.justAdded ? "self" : null, title: `${n.id} (${n.label}, ${n.score.toFixed(3)})` });
    const img = el("img", { src: thumbUrl(knnRes.adapter, knnRes.version, n.id), alt: `${n.label} (${n.id})`, width: 64, height: 64, loading: "eager" });
    img.addEventListener("error", () => img.replaceWith(el("div", { class: "placeholder", role: "img", "aria-label": `no picture for ${n.id}`, text: "no picture" })));
    fig.append(img, el("figcaption", { text: n.label }), el("figcaption", { class: "score", text: n.score.toFixed(3) }));
    if (token() && ITEM_ID.test(n.id)) {
      fig.append(el("button", {
        type: "button", class: "small", "aria-label": `remove ${n.id} from ${knnRes.adapter}'s gallery`, text: "×",
        onclick: () => removeItem(knnRes, n.id),
      }));
    }
    ul.append(el("li", {}, fig));
  }
  wrap.append(ul);
  return wrap;
}

async function removeItem(knnRes, id) {
  clearError();
  try {
    await api("DELETE", `/v1/adapters/${encodeURIComponent(knnRes.adapter + "@" + knnRes.version)}/gallery/${encodeURIComponent(id)}`, null, { admin: true });
    status(`removed ${id} from ${knnRes.adapter}@${knnRes.version}`);
    await run();
  } catch (e) { showError(e); }
}

// The seed c(x): one bar per number, grouped by adapted layer, with 0 and the layer names marked.
function seedChart(seed) {
  const box = el("div", { class: "seed" }, el("h3", { text: "seed c(x)" }));
  if (!seed) { box.append(el("p", { class: "muted", text: "no seed (base or LoRA: the update does not depend on the input)" })); return box; }
  const layers = Object.entries(seed);
  const values = layers.flatMap(([, v]) => v);
  const W = 320, H = 110, top = 6, bottom = 20, gap = 6, left = 28;  // left: room for the axis labels
  const n = values.length, bw = (W - left - gap * (layers.length - 1)) / Math.max(1, n);
  const lo = Math.min(0, ...values), hi = Math.max(0, ...values), span = hi - lo || 1;
  const y = (v) => top + (hi - v) / span * (H - top - bottom);
  const NS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("class", "seed-chart");
  svg.setAttribute("aria-label", `seed: ${layers.map(([l, v]) => `${l} ${v.length} numbers`).join("; ")}; range ${lo.toFixed(2)} to ${hi.toFixed(2)}`);
  const add = (tag, attrs, text) => {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text) e.textContent = text;
    svg.append(e);
    return e;
  };
  const colors = ["#4a7bdc", "#e07b39", "#2fa44f", "#9b59b6"];
  let x = left;
  layers.forEach(([layer, vals], li) => {
    const x0 = x;
    for (const v of vals) {
      add("rect", { x: x.toFixed(2), y: Math.min(y(v), y(0)).toFixed(2), width: Math.max(0.5, bw - 0.3).toFixed(2), height: Math.max(0.5, Math.abs(y(v) - y(0))).toFixed(2), fill: colors[li % colors.length] });
      x += bw;
    }
    add("text", { x: ((x0 + x) / 2).toFixed(1), y: H - 6, "text-anchor": "middle", "font-size": 9, fill: "#5b6470" }, layer.replace(/^blocks\./, "b."));
    x += gap;
  });
  add("line", { x1: left, x2: W, y1: y(0), y2: y(0), stroke: "#1b1f24", "stroke-width": 0.6 });
  add("text", { x: left - 3, y: top + 7, "font-size": 8, "text-anchor": "end", fill: "#5b6470" }, hi.toFixed(2));
  add("text", { x: left - 3, y: y(0) + 3, "font-size": 8, "text-anchor": "end", fill: "#5b6470" }, "0");
  add("text", { x: left - 3, y: H - bottom, "font-size": 8, "text-anchor": "end", fill: "#5b6470" }, lo.toFixed(2));
  box.append(svg);
  return box;
}

function addForm(file, res) {
  const sel = el("select", { "aria-label": `label for ${file.name} in ${res.adapter}'s gallery` });
  const id = el("input", { type: "text", value: "console-" + Date.now().toString(36), "aria-label": "item id", size: 14 });
  const err = el("p", { class: "error", hidden: true, role: "alert" });
  labelsOf(res.adapter, res.version).then((labels) => {
    const best = res.predictions[0] && res.predictions[0].label;
    for (const l of labels) sel.append(el("option", { value: l, text: l, selected: l === best }));
  }).catch((e) => showError(e, err));
  const btn = el("button", {
    type: "button", class: "small", text: "add to gallery",
    onclick: async () => {
      clearError(err);
      try {
        const image = await dataUrl(file);
        const key = `${res.adapter}@${res.version}`;
        await api("PUT", `/v1/adapters/${encodeURIComponent(key)}/gallery/${encodeURIComponent(id.value)}`, { label: sel.value, image }, { admin: true });
        state.justAdded = id.value;
        status(`added ${id.value} to ${key} as ${sel.value}`);
        await run();
      } catch (e) { showError(e, err); }
    },
  });
  return el("div", {}, el("div", { class: "add" }, el("span", { class: "muted", text: "add as" }), sel, id, btn), err);
}

function dataUrl(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });
}

wireInput();
loadAdapters();
