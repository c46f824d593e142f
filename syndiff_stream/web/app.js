// syndiff-stream serve: draw the newest frame and its boxes; ask for the next frame only once this
// one is decoded, so a slow page skips frames instead of queueing them. The text panel is
// refreshed four times a second, not per frame: numbers at 30 Hz are unreadable and cost layout.
"use strict";
const $ = (id) => document.getElementById(id);
const canvas = $("canvas"), ctx = canvas.getContext("2d");
const drawTimes = [], ages = [];
// Read by tests and by the latency measurement (docs/serve.md).
window.syndiff = { shown: 0, ages, lastSeq: 0 };
// What the panel shows next: the last frame drawn, its age, the last state and skip count.
const shown = { header: null, age: null, state: null, skipped: null, boxesOf: null };

function fmt(v, digits = 0, unit = "") { return v == null ? "-" : v.toFixed(digits) + unit; }

function renderPanel() {
  const state = shown.state;
  if (state) {
    const badge = $("state");
    badge.textContent = state.state;
    badge.className = "badge " + state.state;
    $("source").textContent = state.source_id || "";
    $("detail").textContent = state.detail || "";
    if (state.received != null) {
      $("stream-fps").textContent = fmt(state.fps, 1);
      $("received").textContent = state.received;
    }
    const p = state.publisher || {};
    $("drops").textContent = p.dropped == null ? "-" : p.dropped;
    const stale = state.state !== "streaming";
    $("video").classList.toggle("stale", stale);
    $("banner").hidden = !stale;
    $("banner").textContent = stale ? state.state + (window.syndiff.shown ? ": last frame shown is old" : "") : "";
  }
  $("skipped").textContent = shown.skipped == null ? "-" : shown.skipped;
  const header = shown.header;
  if (!header) return;
  const now = performance.now();
  while (drawTimes.length && now - drawTimes[0] > 3000) drawTimes.shift();
  const fps = drawTimes.length > 1 ? (drawTimes.length - 1) * 1000 / (now - drawTimes[0]) : 0;
  $("polyps").textContent = header.valid === false ? "no answer" : header.polyps_total;
  $("fps").textContent = fmt(fps, 1);
  $("latency").textContent = fmt(header.latency_ms, 1, " ms");
  $("age").textContent = fmt(shown.age, 0, " ms");
  $("frames").textContent = window.syndiff.shown;
  if (shown.boxesOf !== header) {
    shown.boxesOf = header;
    $("boxes").replaceChildren(...(header.polyps || []).map((p) => {
      const item = document.createElement("li");
      item.textContent = `[${p.box.join(", ")}] area ${p.area} score ${p.score.toFixed(2)}`;
      return item;
    }));
  }
}
setInterval(renderPanel, 250);

function drawFrame(bitmap, header) {
  if (canvas.width !== bitmap.width || canvas.height !== bitmap.height) {
    canvas.width = bitmap.width;
    canvas.height = bitmap.height;
  }
  ctx.drawImage(bitmap, 0, 0);
  const line = Math.max(1, Math.round(bitmap.width / 360));
  ctx.lineWidth = line;
  ctx.strokeStyle = ctx.fillStyle = "#ffdc00";
  ctx.font = `${6 * line + 6}px sans-serif`;
  for (const p of header.polyps || []) {
    const [x0, y0, x1, y1] = p.box;
    ctx.strokeRect(x0 + line / 2, y0 + line / 2, x1 - x0 - line, y1 - y0 - line);
    ctx.fillText(p.score.toFixed(2), x0, Math.max(y0 - 3, 12));
  }
}

// The newest decoded frame waits here for the next paint; the server may send the one after it
// meanwhile (at most one in flight), so fetching and decoding overlap drawing without a backlog.
let pending = null, painting = false, dropped = 0;

function paint() {
  painting = false;
  const { bitmap, meta } = pending;
  pending = null;
  if (bitmap) { drawFrame(bitmap, meta.header); bitmap.close(); }
  // Age when drawn: just before the paint that shows it, on this machine's clock.
  const age = meta.header.capture_time ? Date.now() - meta.header.capture_time * 1000 : null;
  drawTimes.push(performance.now());
  ages.push(age);
  if (ages.length > 1000) ages.shift();
  window.syndiff.shown += 1;
  window.syndiff.lastSeq = meta.seq;
  Object.assign(shown, { header: meta.header, age, state: meta.state, skipped: meta.skipped + dropped });
}

function connect() {
  const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws");
  ws.binaryType = "arraybuffer";
  ws.onmessage = async (event) => {
    if (typeof event.data === "string") {
      const msg = JSON.parse(event.data);
      Object.assign(shown, { state: msg.state, skipped: msg.skipped + dropped });
      if (msg.state.state !== "streaming") renderPanel();  // a stall shows at once
      return;
    }
    const n = new DataView(event.data).getUint32(0);
    const meta = JSON.parse(new TextDecoder().decode(new Uint8Array(event.data, 4, n)));
    let bitmap = null;
    try {
      bitmap = await createImageBitmap(new Blob([new Uint8Array(event.data, 4 + n)], { type: "image/jpeg" }));
    } catch (err) { /* a frame the browser cannot decode: its header still counts */ }
    if (pending) {  // decoded twice before one paint: only the newer is drawn
      if (pending.bitmap) pending.bitmap.close();
      dropped += 1;
    }
    pending = { bitmap, meta };
    if (!painting) { painting = true; requestAnimationFrame(paint); }
    if (ws.readyState === WebSocket.OPEN) ws.send("ready");
  };
  ws.onclose = () => {
    shown.state = { state: "reconnecting", detail: "the page lost its connection to syndiff-stream serve" };
    renderPanel();
    setTimeout(connect, 1000);
  };
}
connect();
