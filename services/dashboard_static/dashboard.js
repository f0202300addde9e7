// neuroarcade live dashboard: one websocket, binary messages = frames, text messages = state snapshots.
// Hand-written canvas drawing, no external libraries, no network beyond this server.
"use strict";

const $ = (id) => document.getElementById(id);
const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"];
const token = new URLSearchParams(location.search).get("token");
let state = null, brainMap = null, ws = null;
const colorOf = {};  // stream key -> colour, stable over the session
const view = { frames: 0, frameTimes: [], lastSeq: -1 };

function streamColor(key) {
  if (!(key in colorOf)) colorOf[key] = PALETTE[Object.keys(colorOf).length % PALETTE.length];
  return colorOf[key];
}
const fmt = (x, d = 2) => (x === null || x === undefined || Number.isNaN(x)) ? "–" : Number(x).toFixed(d);
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));

// --- connection ---------------------------------------------------------------------------------------
function connect() {
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws" +
    (token ? "?token=" + encodeURIComponent(token) : "");
  ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => { $("conn").textContent = "connected"; $("conn").className = "conn on"; sendKeys(); };
  ws.onclose = () => { $("conn").textContent = "disconnected"; $("conn").className = "conn off"; setTimeout(connect, 1000); };
  ws.onmessage = (ev) => {
    if (typeof ev.data === "string") { state = JSON.parse(ev.data); render(); }
    else drawFrame(ev.data);
  };
}

// --- game frame ---------------------------------------------------------------------------------------
const offscreen = document.createElement("canvas");
function drawFrame(buf) {
  const dv = new DataView(buf);
  const seq = dv.getUint32(4, true), h = dv.getUint16(8, true), w = dv.getUint16(10, true), c = dv.getUint32(12, true);
  const px = new Uint8Array(buf, 16);
  if (offscreen.width !== w || offscreen.height !== h) { offscreen.width = w; offscreen.height = h; }
  const octx = offscreen.getContext("2d");
  const img = octx.createImageData(w, h);
  for (let i = 0, j = 0; i < w * h; i++, j += c) {
    img.data[4 * i] = px[j]; img.data[4 * i + 1] = px[j + (c > 1 ? 1 : 0)]; img.data[4 * i + 2] = px[j + (c > 2 ? 2 : 0)];
    img.data[4 * i + 3] = 255;
  }
  octx.putImageData(img, 0, 0);
  const canvas = $("game"), ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(offscreen, 0, 0, canvas.width, canvas.height);
  view.frames++;
  const now = performance.now();
  view.frameTimes = view.frameTimes.filter((t) => now - t < 2000); view.frameTimes.push(now);
  view.lastSeq = seq;
  const el = $("frame-seq");
  el.textContent = String(seq); el.dataset.seq = String(seq);
}

// --- keyboard play and the scanner trigger key ----------------------------------------------------------
// The server maps held keys to the game's action (arrows/WASD + space, or the --keymap of a button box)
// and stamps a trigger keypress when it arrives; the page only says which keys are down, in press order.
const KEYS = {ArrowUp: "UP", ArrowDown: "DOWN", ArrowLeft: "LEFT", ArrowRight: "RIGHT", " ": "FIRE",
              w: "UP", s: "DOWN", a: "LEFT", d: "RIGHT"};
const normKey = (k) => (k.length === 1 ? k.toLowerCase() : k);  // as services.dashboard.normalize_key
let held = [];  // keys down, oldest first
function send(obj) { if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(obj)); }
function sendKeys() { send({type: "keys", keys: held}); }
function keymapOf(s) { return Object.fromEntries(((s && s.inputs && s.inputs.keymap) || []).map(([k, a]) => [k, a])); }
function onKey(ev, down) {
  if (!state) return;
  const k = normKey(ev.key), inp = state.inputs || {};
  if (inp.trigger_key && k === inp.trigger_key) {  // the sync box's pulse: never a game key
    ev.preventDefault();
    if (down && !ev.repeat) send({type: "trigger", key: ev.key});
    return;
  }
  if (!state.play || !state.play.enabled) return;
  const km = keymapOf(state);
  if (!(Object.keys(km).length ? k in km : k in KEYS)) return;
  ev.preventDefault();
  const had = held.includes(k);
  if (down && !had) held.push(k);
  if (!down) held = held.filter((x) => x !== k);
  if (had !== down) sendKeys();
}
window.addEventListener("keydown", (e) => onKey(e, true));
window.addEventListener("keyup", (e) => onKey(e, false));
window.addEventListener("blur", () => { held = []; sendKeys(); });

// --- rendering of a snapshot ------------------------------------------------------------------------------
function render() {
  const s = state, g = s.game || {}, f = s.frame || {}, e = s.emulator || {};
  $("game-name").textContent = g.game || "–";
  $("game-mode").textContent = g.mode ? `${g.mode}${g.step_hz ? ` · ${fmt(g.step_hz, 1)} Hz` : ""}` : "–";
  $("session-id").textContent = f.session_id || e.session_id || "–";
  const meanings = g.action_meanings || [];
  const now = performance.now();
  const fps = view.frameTimes.length > 1 ? (view.frameTimes.length - 1) / ((now - view.frameTimes[0]) / 1000) : null;
  $("frame-fps").textContent = `${fmt(fps, 1)} fps shown · ${fmt(s.frame_fps, 1)} fps stream`;
  if (f.seq !== undefined) {
    $("frame-step").textContent = `${f.episode} · ${f.step}`;
    $("frame-score").textContent = fmt(e.score, 0);
    const name = f.action >= 0 ? (meanings[f.action] || `#${f.action}`) : "reset";
    $("frame-action").textContent = `${name} by ${f.controller || "–"}`;
    $("frame-age").textContent = `${fmt(f.age_ms, 0)} ms`;
  }
  $("emu-steps").textContent = e.steps !== undefined ? `${e.steps} · ${e.rejected} msgs rejected` : "–";
  const clients = e.clients || {};
  $("emu-clients").innerHTML = Object.keys(clients).length
    ? Object.entries(clients).map(([k, v]) => `<span class="chip">${esc(k)}: ${esc(v)}</span>`).join(" ") : "–";
  renderPlay(s.play || {}, meanings, s.inputs || {});
  renderTriggers(s.inputs || {});
  renderQuality(s.quality || {});
  renderClock(s.scanner || {});
  renderAgents(s.agents || {}, meanings, f.seq);
  renderStreams(s.streams || {});
  $("counts").textContent = Object.entries(s.counts || {}).map(([k, v]) => `${k}: ${v}`).join("   ") || "–";
}

function renderPlay(p, meanings, inp) {
  $("play").classList.toggle("hidden", !p.enabled);
  if (!p.enabled) return;
  $("play-role").textContent = p.role === "controller" ? "you control the game" : `role: ${p.role || "–"}`;
  const km = inp.keymap || [], unplayable = new Set(p.unplayable_keys || []);
  $("play-help").textContent = km.length ? "Click the game, then press the buttons:"
    : "Click the game, then ←↑→↓ to move, space = FIRE.";
  const table = $("play-keymap");
  table.classList.toggle("hidden", !km.length);
  const rows = km.map(([k, a]) => `<tr class="${unplayable.has(k) ? "unplayable" : ""}" data-key="${esc(k)}" data-action="${esc(a)}"` +
    ` title="${unplayable.has(k) ? "not an action of this game" : ""}"><td class="k mono">${esc(k === " " ? "space" : k)}</td>` +
    `<td>→</td><td class="mono">${esc(a)}</td></tr>`).join("");
  if (table.dataset.rows !== rows) { table.innerHTML = rows; table.dataset.rows = rows; }
  $("play-keys").textContent = held.length ? held.map((k) => (k === " " ? "space" : k)).join("+") : "none";
  $("play-action").textContent = p.action_name || "–";
  $("play-sent").textContent = String(p.actions_sent || 0);
}

function renderTriggers(inp) {
  const on = !!inp.trigger_key || !!inp.serial_port;
  $("triggers").classList.toggle("hidden", !on);
  if (!on) return;
  $("trigger-key").textContent = [inp.trigger_key ? `key "${inp.trigger_key}"` : "", inp.serial_port ? `serial ${inp.serial_port}` : ""]
    .filter(Boolean).join(" + ");
  const bySrc = inp.triggers_by_source || {}, n = Object.values(bySrc).reduce((a, b) => a + b, 0);
  $("trigger-count").textContent = String(n); $("trigger-count").dataset.n = String(n);
  $("trigger-sources").textContent = n ? `(${Object.entries(bySrc).map(([k, v]) => `${k} ${v}`).join(", ")})` : "";
  $("trigger-last").textContent = inp.last_trigger_tr ?? "–";
  const notes = [];
  if (inp.triggers_debounced) notes.push(`${inp.triggers_debounced} dropped: within ${fmt(inp.min_trigger_interval_s, 2)} s of the previous pulse`);
  if (inp.triggers_lost) notes.push(`${inp.triggers_lost} lost: emulator unreachable`);
  $("trigger-dropped").textContent = notes.join(" · ");
}

function renderClock(sc) {
  $("tr-index").textContent = sc.tr_index === null || sc.tr_index === undefined ? "TR –" : `TR ${sc.tr_index}`;
  const tr = sc.tr_s, since = sc.since_trigger_s;
  $("tr-time").textContent = `${fmt(since, 1)} / ${fmt(tr, 2)} s`;
  $("tr-progress").style.width = tr && since !== null ? `${Math.min(100, 100 * since / tr)}%` : "0%";
  $("bold-info").textContent = sc.volumes ? `BOLD vol ${sc.bold_tr} (${sc.volumes} received, ${(sc.bold_shape || []).join("×")})` : "no BOLD yet";
}

function renderAgents(agents, meanings, frameSeq) {
  const ids = Object.keys(agents).sort();
  if (!ids.length) { $("agents").innerHTML = `<p class="dim">No agent streams yet.</p>`; return; }
  $("agents").innerHTML = ids.map((id) => {
    const a = agents[id];
    const conds = Object.entries(a.conditions).map(([cond, c]) => {
      const decided = c.decided_seq ?? c.frame_seq;
      const behind = frameSeq !== undefined && decided !== undefined && decided !== null ? frameSeq - decided : null;
      const actName = c.action !== undefined ? (meanings[c.action] || `#${c.action}`) : null;
      const meta = [
        actName !== null ? `<span>action <b class="mono">${esc(actName)}</b></span>` : "",
        `<span>latency <b class="mono">${fmt(c.latency_ms, 1)}</b> ms</span>`,
        `<span title="agent time of the activation minus emulator time of the newest frame it covers">staleness <b class="mono">${fmt(c.staleness_ms, 1)}</b> ms</span>`,
        `<span title="newest frame on the stream minus the frame decided on">behind <b class="mono">${behind ?? "–"}</b> frames</span>`,
        `<span>rate <b class="mono">${fmt(c.rate_hz, 1)}</b> Hz</span>`,
        c.layers ? `<span class="dim">${c.layers.length} layer(s) × ${c.dim} · ${esc(c.pooling || "")}</span>` : "",
      ].join("");
      let bars = "";
      if (c.probs && c.probs.length) {
        bars = `<div class="bars">` + c.probs.map((p, i) => `<span class="mono">${esc(meanings[i] || "#" + i)}</span>
          <span class="bar"><div class="${i === c.action ? "chosen" : ""}" style="width:${100 * (p || 0)}%"></div></span>
          <span class="mono">${fmt(p, 2)}</span>`).join("") + `</div>`;
      } else if (actName === null) {
        bars = `<div class="dim small">per-action probabilities not published by this agent (Activation only)</div>`;
      }
      return `<div class="cond"><span class="chip">${esc(cond || "default")}</span><div class="meta">${meta}</div>${bars}</div>`;
    }).join("");
    return `<div class="agent"><span class="name">${esc(id)}</span><span class="model">${esc(a.model || "")}</span>${conds}</div>`;
  }).join("");
}

// --- time courses -------------------------------------------------------------------------------------------
function niceTicks(lo, hi, n) {
  const span = hi - lo || 1, step0 = span / n, mag = Math.pow(10, Math.floor(Math.log10(step0)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => span / s <= n) || 10 * mag;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9; v += step) out.push(Math.abs(v) < 1e-12 ? 0 : v);
  return out;
}

function setupCanvas(canvas) {
  const r = window.devicePixelRatio || 1, w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * r) || canvas.height !== Math.round(h * r)) {
    canvas.width = Math.round(w * r); canvas.height = Math.round(h * r);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(r, 0, 0, r, 0, 0);
  ctx.clearRect(0, 0, w, h);
  return [ctx, w, h];
}

function lineChart(canvas, opt) {
  const [ctx, W, H] = setupCanvas(canvas);
  const m = {l: 40, r: 8, t: 18, b: 28};
  const pw = W - m.l - m.r, ph = H - m.t - m.b;
  let ylo = Infinity, yhi = -Infinity;
  for (const s of opt.series) for (const y of s.y) if (y !== null) { ylo = Math.min(ylo, y); yhi = Math.max(yhi, y); }
  if (!Number.isFinite(ylo)) { ylo = -1; yhi = 1; }
  const pad = (yhi - ylo) * 0.08 || 0.5; ylo -= pad; yhi += pad;
  const [xlo, xhi] = opt.xrange;
  const X = (x) => m.l + (xhi > xlo ? (x - xlo) / (xhi - xlo) : 0.5) * pw, Y = (y) => m.t + (1 - (y - ylo) / (yhi - ylo)) * ph;
  ctx.font = "10px DejaVu Sans, Arial"; ctx.fillStyle = "#6b7380"; ctx.strokeStyle = "#e3e6ea"; ctx.lineWidth = 1;
  for (const t of niceTicks(ylo, yhi, 4)) {
    ctx.beginPath(); ctx.moveTo(m.l, Y(t)); ctx.lineTo(m.l + pw, Y(t)); ctx.stroke();
    ctx.textAlign = "right"; ctx.textBaseline = "middle"; ctx.fillText(t.toFixed(Math.abs(t) < 10 ? 1 : 0), m.l - 4, Y(t));
  }
  for (const t of niceTicks(xlo, xhi, 5)) {
    if (t !== Math.round(t)) continue;
    ctx.textAlign = "center"; ctx.textBaseline = "top"; ctx.fillText(String(t), X(t), m.t + ph + 3);
  }
  ctx.strokeStyle = "#9aa3b0"; ctx.strokeRect(m.l, m.t, pw, ph);
  ctx.fillStyle = "#1d2430"; ctx.textAlign = "left"; ctx.textBaseline = "top"; ctx.font = "bold 11px DejaVu Sans, Arial";
  ctx.fillText(opt.title, m.l, 3);
  ctx.font = "10px DejaVu Sans, Arial"; ctx.fillStyle = "#6b7380"; ctx.textAlign = "right";
  ctx.fillText(opt.subtitle || "", m.l + pw, 4);
  ctx.textAlign = "center"; ctx.fillText(opt.xlabel, m.l + pw / 2, H - 11);
  ctx.save(); ctx.translate(10, m.t + ph / 2); ctx.rotate(-Math.PI / 2); ctx.fillText(opt.ylabel, 0, 0); ctx.restore();
  ctx.save(); ctx.beginPath(); ctx.rect(m.l, m.t, pw, ph); ctx.clip();
  if (opt.marks && opt.marks.length) {  // shaded TRs (e.g. excluded volumes)
    const w = Math.max(2, xhi > xlo ? pw / (xhi - xlo) : 4);
    ctx.fillStyle = "rgba(214, 39, 40, 0.22)";
    for (const x of opt.marks) ctx.fillRect(X(x) - w / 2, m.t, w, ph);
  }
  for (const s of opt.series) {
    ctx.strokeStyle = s.color; ctx.lineWidth = s.width || 1.5; ctx.setLineDash(s.dash || []);
    ctx.beginPath(); let pen = false;
    s.x.forEach((x, i) => {
      const y = s.y[i];
      if (y === null || y === undefined) { pen = false; return; }
      if (pen) ctx.lineTo(X(x), Y(y)); else ctx.moveTo(X(x), Y(y));
      pen = true;
    });
    ctx.stroke();
  }
  ctx.restore();
}

// Each series z-scored over the TRs shown: the scanner's raw ROI means (≈1000) and the model's
// predictions (z-units) only share a scale once both are standardised, as the scores compare them.
function zscore(y) {
  const v = y.filter((x) => x !== null && Number.isFinite(x));
  if (v.length < 2) return y;
  const m = v.reduce((a, b) => a + b, 0) / v.length;
  const sd = Math.sqrt(v.reduce((a, b) => a + (b - m) * (b - m), 0) / v.length) || 1;
  return y.map((x) => (x === null || !Number.isFinite(x) ? null : (x - m) / sd));
}

function renderStreams(streams) {
  const keys = Object.keys(streams).sort();
  let points = 0;
  keys.forEach((k) => { points += streams[k].tr.length; streamColor(k); });
  $("roi-points").textContent = String(points); $("roi-points").dataset.points = String(points);
  renderMapSelect(keys);
  if (!keys.length) return;
  const roiNames = streams[keys[0]].roi_names || [];
  let xlo = Infinity, xhi = -Infinity;
  keys.forEach((k) => streams[k].tr.forEach((t) => { xlo = Math.min(xlo, t); xhi = Math.max(xhi, t); }));
  $("legend").innerHTML = `<span><span class="sw" style="background:#111;height:2px"></span>measured BOLD</span>` +
    keys.map((k) => `<span><span class="sw" style="background:${streamColor(k)}"></span>predicted · ${esc(k)}</span>`).join("");
  const box = $("roi-charts");
  if (box.dataset.rois !== roiNames.join("|")) {
    box.innerHTML = roiNames.map((n, i) => `<canvas id="roi-${i}" title="${esc(n)}"></canvas>`).join("");
    box.dataset.rois = roiNames.join("|");
  }
  roiNames.forEach((name, i) => {
    const series = [];
    const withMeasured = keys.find((k) => streams[k].measured.some((m) => m.length));
    if (withMeasured) {
      const s = streams[withMeasured];
      series.push({x: s.tr, y: zscore(s.measured.map((m) => (m.length > i ? m[i] : null))), color: "#111", width: 1.5});
    }
    for (const k of keys) {
      const s = streams[k];
      series.push({x: s.tr, y: zscore(s.predicted.map((p) => (p.length > i ? p[i] : null))), color: streamColor(k), width: 1.6});
    }
    const rs = keys.map((k) => fmt((streams[k].scores || [])[i], 2)).join(" / ");
    lineChart($(`roi-${i}`), {series, xrange: [xlo, Math.max(xhi, xlo + 1)], title: name === "all" ? "all (whole mask)" : name,
      subtitle: `r = ${rs}`, xlabel: "TR index", ylabel: "BOLD (z)"});
  });
  renderScores(streams, keys, roiNames);
  renderBrain(streams);
}

function renderScores(streams, keys, roiNames) {
  const head = `<tr><th>ROI</th>` + keys.map((k) => `<th style="color:${streamColor(k)}">${esc(k)}</th>`).join("") + `</tr>`;
  const rows = roiNames.map((n, i) => `<tr><td>${esc(n)}</td>` +
    keys.map((k) => `<td class="mono">${fmt((streams[k].scores || [])[i], 3)}</td>`).join("") + `</tr>`).join("");
  const ntr = `<tr><td class="dim">TRs</td>` + keys.map((k) => `<td class="mono dim">${streams[k].tr.length} (last ${streams[k].last_tr})</td>`).join("") + `</tr>`;
  $("scores-table").innerHTML = `<table class="scores">${head}${rows}${ntr}</table>`;
}

// --- scanner quality: motion, FD, exclusions, processing time per volume --------------------------------------
const MOTION_COLORS = ["#d62728", "#2ca02c", "#1f77b4"];
function renderQuality(quality) {
  const keys = Object.keys(quality).sort(), sel = $("qc-stream");
  if ([...sel.options].map((o) => o.value).join("|") !== keys.join("|")) {
    const cur = sel.value;
    sel.innerHTML = keys.map((k) => `<option value="${esc(k)}">${esc(k)}</option>`).join("");
    if (keys.includes(cur)) sel.value = cur;
  }
  const q = quality[sel.value];
  if (!q) return;
  renderAlignment(sel.value, q);
  const excl = q.tr.filter((t, i) => q.excluded[i]);
  const reasons = Object.entries(q.reasons || {}).map(([r, n]) => `${r} ${n}`).join(", ");
  const box = $("qc-summary");
  box.dataset.volumes = String(q.volumes); box.dataset.excluded = String(q.excluded_total);
  const fdShown = q.fd.filter((x) => x !== null);
  box.innerHTML = `volumes <b class="mono">${q.volumes}</b> (last TR ${q.last_tr ?? "–"}) · ` +
    `TRs excluded <span class="excl mono" id="qc-excluded">${q.excluded_total}</span>${reasons ? ` (${esc(reasons)})` : ""} · ` +
    `FD max <b class="mono">${fmt(fdShown.length ? Math.max(...fdShown) : null, 2)}</b> mm · ` +
    `processing per volume p50 <b class="mono" id="qc-ms-p50">${fmt(q.process_ms_p50, 1)}</b> ms, ` +
    `max <b class="mono">${fmt(q.process_ms_max, 1)}</b> ms`;
  const xr = [q.tr.length ? q.tr[0] : 0, q.tr.length ? Math.max(q.tr[q.tr.length - 1], q.tr[0] + 1) : 1];
  const col = (j, scale) => q.params.map((p) => (p && p.length > j && p[j] !== null ? p[j] * scale : null));
  const deg = 180 / Math.PI;
  lineChart($("qc-trans"), {series: ["x", "y", "z"].map((a, j) => ({x: q.tr, y: col(j, 1), color: MOTION_COLORS[j]})),
    xrange: xr, title: "translation (mm)", subtitle: "x red · y green · z blue", xlabel: "TR index", ylabel: "mm", marks: excl});
  lineChart($("qc-rot"), {series: ["x", "y", "z"].map((a, j) => ({x: q.tr, y: col(j + 3, deg), color: MOTION_COLORS[j]})),
    xrange: xr, title: "rotation (°)", subtitle: "pitch red · roll green · yaw blue", xlabel: "TR index", ylabel: "degrees", marks: excl});
  lineChart($("qc-fd"), {series: [{x: q.tr, y: q.fd, color: "#111"}], xrange: xr, title: "framewise displacement (mm)",
    subtitle: "red: excluded", xlabel: "TR index", ylabel: "FD mm", marks: excl});
  lineChart($("qc-time"), {series: [{x: q.tr, y: q.process_ms, color: "#2f6db5"}, {x: q.tr, y: q.preprocess_ms, color: "#9aa3b0", dash: [4, 3]}],
    xrange: xr, title: "time per volume (ms)", subtitle: "whole · - - preprocessing", xlabel: "TR index", ylabel: "ms"});
}
$("qc-stream").addEventListener("change", () => state && renderQuality(state.quality || {}));

// The session's registration to the weights' space (once per session) and its overlay image, per stream.
function renderAlignment(key, q) {
  const box = $("qc-align"), chip = $("qc-align-state"), a = q.aligned ?? -1;
  box.dataset.aligned = String(a);
  chip.textContent = a === 1 ? "aligned" : a === 0 ? "NOT aligned" : q.registration ? "not registered" : "not yet";
  chip.className = "chip" + (a === 1 ? " ok" : a === 0 ? " bad" : "");
  $("qc-align-text").textContent = a === 1
    ? `translation ${fmt(q.align_mm, 2)} mm · rotation ${fmt(q.align_deg, 2)}° · match r ${fmt(q.align_match_r, 3)}`
    : (q.registration || "").replace(/^NOT aligned:\s*/, "");
  const img = $("qc-overlay");
  if (!q.overlay) { img.classList.add("hidden"); img.removeAttribute("src"); img.dataset.src = ""; return; }
  const src = "/api/overlay.png?stream=" + encodeURIComponent(key) + "&v=" + q.overlay +
    (token ? "&token=" + encodeURIComponent(token) : "");
  if (img.dataset.src !== src) { img.dataset.src = src; img.src = src; }
  img.classList.remove("hidden");
}

// --- brain map --------------------------------------------------------------------------------------------
function renderMapSelect(keys) {
  const sel = $("map-stream");
  const have = [...sel.options].map((o) => o.value).join("|");
  if (have === keys.join("|")) return;
  const cur = sel.value;
  sel.innerHTML = keys.map((k) => `<option value="${esc(k)}">${esc(k)}</option>`).join("");
  if (keys.includes(cur)) sel.value = cur;
}
$("map-stream").addEventListener("change", () => state && renderBrain(state.streams || {}));

// Diverging blue-white-red (RdBu_r-like) for r in [-lim, lim].
function diverging(v, lim) {
  const t = Math.max(-1, Math.min(1, v / lim));
  const lo = [33, 102, 172], mid = [247, 247, 247], hi = [178, 24, 43];
  const a = t < 0 ? lo : hi, k = Math.abs(t);
  return `rgb(${mid.map((m, j) => Math.round(m + (a[j] - m) * k)).join(",")})`;
}

function renderBrain(streams) {
  const key = $("map-stream").value, s = streams[key];
  const canvas = $("brainmap"), ctx = canvas.getContext("2d");
  ctx.fillStyle = "#000"; ctx.fillRect(0, 0, canvas.width, canvas.height);
  if (!s) return;
  const score = {};
  (s.roi_names || []).forEach((n, i) => { score[n] = (s.scores || [])[i]; });
  const vals = Object.entries(score).filter(([n, v]) => n !== "all" && v !== null && v !== undefined).map(([, v]) => Math.abs(v));
  const lim = Math.max(0.1, Math.ceil(10 * Math.max(0, ...vals)) / 10);
  ctx.font = "11px DejaVu Sans, Arial";
  if (brainMap) {
    const n = brainMap.z.length, cols = Math.min(4, n), rows = Math.ceil(n / cols);
    const [nx, ny] = brainMap.shape, cw = canvas.width / cols, ch = canvas.height / rows;
    const px = Math.min((cw - 4) / nx, (ch - 16) / ny);
    brainMap.z.forEach((z, k) => {
      const ox = (k % cols) * cw + (cw - nx * px) / 2, oy = Math.floor(k / cols) * ch + 2;
      const lab = brainMap.slices[k], msk = brainMap.mask[k];
      for (let r = 0; r < ny; r++) for (let c = 0; c < nx; c++) {
        const i = r * nx + c, l = lab[i];
        let col = null;
        if (l > 0) { const v = score[brainMap.names[String(l)]]; col = v === null || v === undefined ? "#666" : diverging(v, lim); }
        else if (msk[i]) col = "#3c3c3c";
        if (col) { ctx.fillStyle = col; ctx.fillRect(ox + c * px, oy + r * px, Math.ceil(px), Math.ceil(px)); }
      }
      ctx.fillStyle = "#bbb"; ctx.textAlign = "center"; ctx.fillText(brainMap.z_mm ? `z = ${brainMap.z_mm[k]} mm` : `z = ${z}`, ox + nx * px / 2, oy + ny * px + 11);
    });
    $("map-note").textContent = `Axial slices, world z in mm, neurological view (left of image = left hemisphere, anterior up). ROI colour = running r of ${key}; grey = ROI without a score yet.`;
  } else {
    const names = (s.roi_names || []).filter((n) => n !== "all"), cols = Math.ceil(Math.sqrt(names.length || 1));
    const cw = canvas.width / cols, ch = canvas.height / Math.ceil((names.length || 1) / cols);
    names.forEach((n, k) => {
      const x = (k % cols) * cw, y = Math.floor(k / cols) * ch, v = score[n];
      ctx.fillStyle = v === null || v === undefined ? "#666" : diverging(v, lim); ctx.fillRect(x + 2, y + 2, cw - 4, ch - 4);
      ctx.fillStyle = "#111"; ctx.textAlign = "center"; ctx.fillText(`${n}  r=${fmt(v, 2)}`, x + cw / 2, y + ch / 2);
    });
    $("map-note").textContent = "No atlas given to the dashboard (--atlas or --weights): ROI tiles instead of slices.";
  }
  drawColorbar(lim);
  $("roi-legend").innerHTML = (s.roi_names || []).map((n, i) => {
    const v = (s.scores || [])[i];
    const sw = v === null || v === undefined ? "#666" : diverging(v, lim);
    return `<span><span class="sw" style="background:${sw}"></span>${esc(n)} <b class="mono">${fmt(v, 2)}</b></span>`;
  }).join("");
}

function drawColorbar(lim) {
  const c = $("colorbar"), ctx = c.getContext("2d"), x0 = 60, w = c.width - 120;
  ctx.clearRect(0, 0, c.width, c.height);
  for (let i = 0; i < w; i++) { ctx.fillStyle = diverging(-lim + 2 * lim * i / (w - 1), lim); ctx.fillRect(x0 + i, 4, 1, 12); }
  ctx.strokeStyle = "#555"; ctx.strokeRect(x0, 4, w, 12);
  ctx.fillStyle = "#1d2430"; ctx.font = "10px DejaVu Sans, Arial"; ctx.textAlign = "center"; ctx.textBaseline = "top";
  for (const t of [-lim, -lim / 2, 0, lim / 2, lim]) ctx.fillText(t.toFixed(2), x0 + (t + lim) / (2 * lim) * w, 19);
  ctx.fillText("Pearson r (running, predicted vs measured ROI mean)", x0 + w / 2, 31);
}

// --- start ---------------------------------------------------------------------------------------------
fetch("/api/brainmap" + (token ? "?token=" + encodeURIComponent(token) : ""))
  .then((r) => (r.ok ? r.json() : null)).then((m) => { brainMap = m; }).catch(() => {});
$("game").addEventListener("click", () => $("game").focus());
connect();
