// Gristmill's dashboard: batches, one batch's shards and errors, workers and the autoscaler,
// polled every 2 s from the coordinator's /v1/dashboard API with the key the user entered
// (kept in sessionStorage). No framework, no build step: text goes into the page through
// textContent only, charts are SVG drawn here.
"use strict";

const POLL_MS = 2000;
const KEY = "gristmill.apiKey";
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);

let timer = null;
let readOnly = false;
let pending = null; // the batch id awaiting cancel confirmation
let session = 0; // bumped when the key changes: answers fetched with the old one are dropped

// ------------------------------------------------------------------ helpers

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    // Through the CSSOM: the Content-Security-Policy forbids style attributes.
    else if (k === "width") el.style.width = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function svg(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

function num(n, digits = 0) {
  if (n === null || n === undefined || Number.isNaN(n)) return "–";
  // What rounds to zero shows as 0, never -0.
  const v = Math.abs(n) < 0.5 / 10 ** digits ? 0 : Number(n);
  return v.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

function duration(s) {
  if (s === null || s === undefined || !Number.isFinite(s)) return "–";
  s = Math.max(0, Math.round(s));
  const d = Math.floor(s / 86400), hh = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60), ss = s % 60;
  if (d) return `${d}d ${hh}h`;
  if (hh) return `${hh}h ${String(m).padStart(2, "0")}m`;
  if (m) return `${m}m ${String(ss).padStart(2, "0")}s`;
  return `${ss}s`;
}

function when(t) {
  if (!t) return "–";
  const d = new Date(t * 1000);
  const today = new Date().toDateString() === d.toDateString();
  return today ? d.toLocaleTimeString() : d.toLocaleString();
}

function key() {
  return sessionStorage.getItem(KEY) || "";
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (key()) headers.Authorization = `Bearer ${key()}`;
  const r = await fetch(path, Object.assign({}, options, { headers }));
  if (r.status === 401) {
    const body = await r.json().catch(() => ({}));
    throw Object.assign(new Error(body.error?.message || "unauthorized"), { status: 401 });
  }
  if (!r.ok) {
    const body = await r.json().catch(() => ({}));
    throw Object.assign(new Error(body.error?.message || `${r.status} ${r.statusText}`), { status: r.status });
  }
  return r;
}

function show(section) {
  for (const id of ["login", "overview", "batch"]) $(id).hidden = id !== section;
  $("forget").hidden = section === "login";
}

function setLive(text, error) {
  $("live").textContent = text;
  $("live").classList.toggle("error", Boolean(error));
}

function progressBar(b) {
  const c = b.request_counts || { total: 0, completed: 0, failed: 0 };
  const total = Math.max(c.total, 1);
  const done = c.completed + c.failed;
  const pct = (x) => `${(100 * x / total).toFixed(2)}%`;
  const label = `${num(c.completed)} completed, ${num(c.failed)} failed of ${num(c.total)} lines`;
  return h("div", { class: "progress" },
    h("div", {
      class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": c.total,
      "aria-valuenow": done, "aria-label": label,
    },
      h("span", { class: "ok", width: pct(c.completed) }),
      h("span", { class: "bad", width: pct(c.failed) })),
    h("span", { class: "counts" }, `${num(done)} / ${num(c.total)}`,
      c.failed ? h("span", { class: "error" }, ` (${num(c.failed)} failed)`) : null));
}

function statusBadge(s) {
  return h("span", { class: `status s-${s}` }, s.replace("_", " "));
}

const LIVE = new Set(["validating", "in_progress", "finalizing", "cancelling"]);

async function download(fileId, name) {
  try {
    const r = await api(`/v1/files/${encodeURIComponent(fileId)}/content`);
    const url = URL.createObjectURL(await r.blob());
    const a = h("a", { href: url, download: name });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (e) {
    setLive(`download failed: ${e.message}`, true);
  }
}

function fileLinks(b) {
  const out = [];
  if (b.output_file_id) {
    out.push(h("button", { type: "button", class: "link", onclick: () => download(b.output_file_id, `${b.id}-output.jsonl`) }, "output"));
  }
  if (b.error_file_id) {
    out.push(h("button", { type: "button", class: "link", onclick: () => download(b.error_file_id, `${b.id}-errors.jsonl`) }, "errors"));
  }
  return out.length ? out : "–";
}

function cancelButton(b) {
  if (readOnly || !LIVE.has(b.status) || b.status === "cancelling") return null;
  return h("button", { type: "button", class: "danger small", "data-cancel": b.id, onclick: () => askCancel(b) }, "Cancel");
}

// ------------------------------------------------------------------ cancel

function askCancel(b) {
  pending = b.id;
  const c = b.request_counts || {};
  $("confirm-text").textContent =
    `Batch ${b.id} has ${num((c.completed || 0) + (c.failed || 0))} of ${num(c.total || 0)} lines done. ` +
    "Cancelling stops its shards; lines already done stay in its output file, the rest are reported as cancelled.";
  $("confirm").showModal();
}

async function confirmed() {
  const id = pending;
  pending = null;
  if (!id) return;
  try {
    await api(`/v1/batches/${encodeURIComponent(id)}/cancel`, { method: "POST" });
    setLive(`cancelling ${id}`);
  } catch (e) {
    setLive(`cancel failed: ${e.message}`, true);
  }
  refresh();
}

// ------------------------------------------------------------------ overview

function renderOverview(d) {
  readOnly = Boolean(d.read_only);
  $("coordinator").textContent = `coordinator ${d.coordinator}${readOnly ? " · read-only key" : ""}`;
  const body = $("batches").tBodies[0];
  const rows = d.batches.map((b) => {
    const x = b.dashboard || {};
    const c = b.request_counts || {};
    return h("tr", {
      "data-batch-id": b.id, "data-status": b.status, "data-total": c.total,
      "data-completed": c.completed, "data-failed": c.failed,
    },
      h("th", { scope: "row" }, h("a", { href: `#/batch/${encodeURIComponent(b.id)}` }, b.id),
        b.metadata?.description ? h("div", { class: "muted small" }, String(b.metadata.description)) : null),
      h("td", {}, statusBadge(b.status)),
      h("td", { class: "wide" }, progressBar(b)),
      h("td", { class: "num" }, num(x.tokens_per_s_now, 1)),
      h("td", { class: "num" }, num(x.tokens_per_s_avg, 1)),
      h("td", {}, when(b.created_at)),
      h("td", {}, when(x.ended_at)),
      h("td", { class: "num" }, LIVE.has(b.status) ? duration(x.eta_s) : "–"),
      h("td", {}, fileLinks(b)),
      h("td", {}, cancelButton(b)));
  });
  body.replaceChildren(...(rows.length ? rows : [h("tr", {}, h("td", { colspan: 10, class: "muted" }, "No batches yet."))]));
  const k = d.cluster || {};
  $("totals").textContent =
    `${num(k.completion_tokens_per_s, 1)} completion tokens/s now · ${num(k.results_total)} line results counted · ${num(k.dead_shards_total)} dead shards since this coordinator led`;

  const workers = d.workers.map((w) => h("tr", { "data-worker": w.name, "data-in-flight": w.shards_in_flight },
    h("th", { scope: "row" }, w.name),
    h("td", { class: "num" }, num(w.tokens_per_s, 1)),
    h("td", { class: "num" }, num(w.lines_per_s, 1)),
    h("td", { class: "num" }, num(w.shards_in_flight)),
    h("td", { class: `num${w.last_seen_s_ago > 30 ? " error" : ""}` }, `${duration(w.last_seen_s_ago)} ago`)));
  $("workers").tBodies[0].replaceChildren(...(workers.length ? workers
    : [h("tr", {}, h("td", { colspan: 5, class: "muted" }, "No worker heard from yet."))]));

  const a = d.autoscale || {};
  const dl = $("autoscale");
  const item = (k, v) => [h("dt", {}, k), h("dd", {}, v)];
  if (!a.enabled) {
    dl.replaceChildren(...item("Policy", "off (start the coordinator with --autoscale or --autoscale-dry-run)"));
  } else {
    dl.replaceChildren(
      ...item("Mode", a.applied ? "applied to the worker StatefulSet" : "dry run (logged only)"),
      ...item("Desired replicas", a.desired_replicas === undefined ? "not decided yet" : `${a.desired_replicas} (now ${a.current_replicas}; limits ${a.min_replicas}–${a.max_replicas})`),
      ...item("Why", a.reason ? `${a.reason}: ${a.why}` : "–"),
      ...item("Deadlines need", num(a.deadline_need)),
      ...item("Pending tokens", num(a.pending_tokens)),
      ...item("One worker retires", a.tokens_per_s_per_worker ? `${num(a.tokens_per_s_per_worker, 1)} tokens/s (measured)` : "not measured yet"),
      ...item("Active workers", num(a.active_workers)));
  }
}

// ------------------------------------------------------------------ one batch

function chart(points, { label, color }) {
  const W = 560, H = 180, L = 56, R = 10, T = 10, B = 28;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", class: "chart" });
  if (points.length < 2) {
    root.append(svg("title", {}, `${label}: not enough samples yet`));
    root.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "axis" }, "waiting for samples…"));
    return root;
  }
  const t0 = points[0][0], t1 = points[points.length - 1][0];
  const ymax = Math.max(1, ...points.map((p) => p[1]));
  const x = (t) => L + (W - L - R) * (t1 > t0 ? (t - t0) / (t1 - t0) : 1);
  const y = (v) => T + (H - T - B) * (1 - v / ymax);
  const path = points.map((p, i) => `${i ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join("");
  const last = points[points.length - 1][1];
  root.append(svg("title", {}, `${label}: ${num(last, 1)} now, at most ${num(ymax, 1)}, over ${duration(t1 - t0)}`));
  for (const f of [0, 0.5, 1]) {
    root.append(svg("line", { x1: L, x2: W - R, y1: y(ymax * f), y2: y(ymax * f), class: "grid" }));
    root.append(svg("text", { x: L - 6, y: y(ymax * f) + 4, "text-anchor": "end", class: "axis" }, num(ymax * f, ymax < 10 ? 1 : 0)));
  }
  root.append(svg("text", { x: L, y: H - 8, class: "axis" }, when(t0)));
  root.append(svg("text", { x: W - R, y: H - 8, "text-anchor": "end", class: "axis" }, `${when(t1)} (${duration(t1 - t0)})`));
  root.append(svg("path", { d: `${path}L${x(t1)},${y(0)}L${x(t0)},${y(0)}Z`, fill: color, "fill-opacity": 0.15 }));
  root.append(svg("path", { d: path, fill: "none", stroke: color, "stroke-width": 2 }));
  return root;
}

function rateSeries(history) {
  const out = [];
  for (let i = 1; i < history.length; i++) {
    const a = history[i - 1], b = history[i];
    const dt = b.t - a.t;
    if (dt > 0) out.push([b.t, Math.max(0, (b.tokens - a.tokens) / dt)]);
  }
  return out;
}

function renderBatch(b) {
  const x = b.dashboard || {};
  const c = b.request_counts || {};
  $("batch-title").textContent = `Batch ${b.id}`;
  const head = h("div", {
    id: "batch-counts", "data-status": b.status, "data-total": c.total,
    "data-completed": c.completed, "data-failed": c.failed,
  },
    h("p", {}, statusBadge(b.status), " ", cancelButton(b)),
    progressBar(b),
    h("dl", { class: "facts" },
      h("dt", {}, "Tokens/s now"), h("dd", {}, num(x.tokens_per_s_now, 1)),
      h("dt", {}, "Average"), h("dd", {}, num(x.tokens_per_s_avg, 1)),
      h("dt", {}, "Time left"), h("dd", {}, LIVE.has(b.status) ? duration(x.eta_s) : "–"),
      h("dt", {}, "Created"), h("dd", {}, when(b.created_at)),
      h("dt", {}, "Finished"), h("dd", {}, when(x.ended_at)),
      h("dt", {}, "Window ends"), h("dd", {}, when(b.expires_at)),
      h("dt", {}, "Usage"), h("dd", {}, `${num(b.usage?.input_tokens)} prompt + ${num(b.usage?.output_tokens)} completion tokens`),
      h("dt", {}, "Files"), h("dd", {}, fileLinks(b))));
  $("batch-head").replaceChildren(head);
  const history = b.history || [];
  $("chart-lines").replaceChildren(chart(history.map((p) => [p.t, p.completed + p.failed]), { label: "Lines done", color: "#2f7d32" }));
  $("chart-rate").replaceChildren(chart(rateSeries(history), { label: "Tokens per second", color: "#1f5fa8" }));

  const k = b.shard_counts || {};
  $("shard-counts").textContent =
    `${num(x.shards)} shards: ${num(k.running)} running, ${num(k.pending)} pending, ${num(k.done)} done, ` +
    `${num(k.dead)} dead, ${num(k.redelivered)} redelivered` +
    (b.shards_listed < x.shards ? ` (first ${num(b.shards_listed)} listed)` : "");
  const rows = (b.shard_list || []).map((s) => h("tr", {
    "data-shard": s.shard, "data-status": s.status, "data-deliveries": s.deliveries,
    class: s.deliveries > 1 ? "redelivered" : null,
  },
    h("th", { scope: "row", class: "num" }, s.shard),
    h("td", {}, statusBadge(s.status), s.deliveries > 1 ? h("span", { class: "muted" }, " redelivered") : null),
    h("td", { class: "num" }, `${num(s.reported)} / ${num(s.lines)}`),
    h("td", { class: "num" }, s.deliveries ? num(s.deliveries) : "–"),
    h("td", {}, s.holders.length ? s.holders.map((w) => `${w.worker} (delivery ${w.delivery})`).join(", ") : "–")));
  $("shards").tBodies[0].replaceChildren(...(rows.length ? rows
    : [h("tr", {}, h("td", { colspan: 5, class: "muted" }, "No shards yet."))]));

  const errors = (b.errors_by_code || []).map((e) => h("tr", { "data-code": e.code, "data-count": e.count },
    h("th", { scope: "row" }, h("code", {}, e.code)),
    h("td", { class: "num" }, num(e.count)),
    h("td", { class: "example" }, e.example)));
  $("errors").tBodies[0].replaceChildren(...(errors.length ? errors
    : [h("tr", {}, h("td", { colspan: 3, class: "muted" }, "No failed lines."))]));
}

// ------------------------------------------------------------------ loop

function route() {
  const m = location.hash.match(/^#\/batch\/([A-Za-z0-9_-]+)$/);
  return m ? { batch: m[1] } : {};
}

async function refresh() {
  clearTimeout(timer);
  const r = route();
  const mine = session;
  try {
    if (r.batch) {
      const [o, b] = await Promise.all([
        api("/v1/dashboard?limit=1").then((x) => x.json()),
        api(`/v1/dashboard/batches/${encodeURIComponent(r.batch)}`).then((x) => x.json()),
      ]);
      if (mine !== session) return;
      readOnly = Boolean(o.read_only);
      $("coordinator").textContent = `coordinator ${o.coordinator}${readOnly ? " · read-only key" : ""}`;
      renderBatch(b);
      show("batch");
    } else {
      const o = await (await api("/v1/dashboard?limit=200")).json();
      if (mine !== session) return;
      renderOverview(o);
      show("overview");
    }
    setLive(`updated ${new Date().toLocaleTimeString()}`);
    document.body.dataset.updated = String(Date.now());
  } catch (e) {
    if (mine !== session) return;
    if (e.status === 401) {
      sessionStorage.removeItem(KEY);
      $("login-error").textContent = e.message;
      show("login");
      $("key").focus();
      return;
    }
    setLive(`not updated: ${e.message}`, true);
  }
  timer = setTimeout(refresh, POLL_MS);
}

function start() {
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    session++;
    sessionStorage.setItem(KEY, $("key").value.trim());
    $("key").value = "";
    $("login-error").textContent = "";
    refresh();
  });
  $("forget").addEventListener("click", () => {
    session++;
    sessionStorage.removeItem(KEY);
    clearTimeout(timer);
    show("login");
    $("key").focus();
  });
  $("confirm").addEventListener("close", () => {
    if ($("confirm").returnValue === "yes") confirmed();
    else pending = null;
  });
  window.addEventListener("hashchange", () => {
    refresh();
    $("main").focus();
  });
  // A coordinator without keys opens at once; with keys, a 401 asks for one.
  refresh();
}

start();
