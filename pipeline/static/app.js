// Faultline dashboard: one tile per line from the live WebSocket feed, recent
// failures with their boxes, and the defect rate per minute from the REST API.
// Plain browser JavaScript, served as is; no build step.
"use strict";

const RATE_WINDOW_MS = 10000;
const DEFECT_WINDOW_MS = 60000;
const MAX_FAILURES = 50;
const FAILURE_THUMBNAILS = 12;
const FRAME_FETCHES = 2;
const FRAME_CACHE_ENTRIES = 64;
const SEEN_FRAME_IDS = 5000;
const CHART_REFRESH_MS = 15000;
const CHART_RANGE_MS = 3600000;
const CHART_NEW_LINE_DELAY_MS = 2000;
// A reconnect requests results from this long before the newest one it got,
// so results inferred out of order are not lost. Duplicates are skipped.
const SINCE_MARGIN_MS = 5000;
const MAX_RETRY_MS = 30000;
const BOX_COLOUR = "#ff0000";
const LINE_COLOURS = ["#4e9bff", "#ff9f0a", "#30d158", "#bf5af2", "#ffd60a", "#64d2ff", "#ff375f", "#ac8e68"];
// Close codes after which reconnecting cannot help; see docs/results.md.
const FINAL_CLOSE_CODES = {
  4400: ["invalid", "invalid request"],
  4401: ["unauthorized", "token missing or invalid"],
  4403: ["forbidden", "token has no view right on these lines"],
};

const state = {
  token: "",
  lines: [],
  socket: null,
  retryMs: 1000,
  retryTimer: null,
  watchdog: null,
  heartbeatMs: 10000,
  lastMessageAt: 0,
  newestInferredMs: null,
  seen: new Set(),
  seenOrder: [],
  tiles: new Map(),
  missedTotal: 0,
  frameCache: new Map(),
  frameQueue: { urgent: [], later: [] },
  frameFetchesRunning: 0,
  chartTimer: null,
  chartSoonTimer: null,
  chartedLines: new Set(),
};

const $ = (selector, root = document) => root.querySelector(selector);

function setConnection(stateName, text) {
  const element = $("#connection");
  element.dataset.state = stateName;
  element.textContent = text;
}

function authHeaders() {
  return state.token ? { Authorization: `Bearer ${state.token}` } : {};
}

async function getJson(path, params = {}) {
  const url = new URL(path, window.location.origin);
  for (const [name, value] of Object.entries(params)) {
    if (value !== null && value !== undefined && value !== "") url.searchParams.set(name, value);
  }
  const response = await fetch(url, { headers: authHeaders() });
  if (!response.ok) {
    const detail = await response.text();
    throw new Error(`${path}: HTTP ${response.status} ${detail}`);
  }
  return response.json();
}

// --- tiles ---------------------------------------------------------------

function lineColour(line) {
  const known = [...state.tiles.keys()].sort();
  const index = known.indexOf(line);
  return LINE_COLOURS[(index < 0 ? known.length : index) % LINE_COLOURS.length];
}

function tileFor(line) {
  let tile = state.tiles.get(line);
  if (tile) return tile;
  const element = $("#tile-template").content.firstElementChild.cloneNode(true);
  element.dataset.line = line;
  $(".tile-line", element).textContent = line;
  tile = { element, arrivals: [], recent: [], frames: 0, lastFail: null };
  state.tiles.set(line, tile);
  const container = $("#tiles");
  const after = [...container.children].find((child) => child.dataset.line > line);
  container.insertBefore(element, after || null);
  return tile;
}

function updateTileNumbers(tile, now) {
  while (tile.arrivals.length && tile.arrivals[0] < now - RATE_WINDOW_MS) tile.arrivals.shift();
  while (tile.recent.length && tile.recent[0].at < now - DEFECT_WINDOW_MS) tile.recent.shift();
  const element = tile.element;
  $(".rate", element).textContent = `${(tile.arrivals.length / (RATE_WINDOW_MS / 1000)).toFixed(1)} frames/s`;
  const defectCell = $(".defect-rate", element);
  if (tile.recent.length) {
    const failed = tile.recent.filter((entry) => entry.fail).length;
    const rate = failed / tile.recent.length;
    defectCell.textContent = `${(100 * rate).toFixed(1)} % (${failed} of ${tile.recent.length})`;
    defectCell.classList.toggle("high", rate >= 0.5);
  } else {
    defectCell.textContent = "n/a";
    defectCell.classList.remove("high");
  }
  $(".frames", element).textContent = String(tile.frames);
}

function refreshTiles() {
  const now = performance.now();
  for (const tile of state.tiles.values()) updateTileNumbers(tile, now);
}

// --- frames and boxes ----------------------------------------------------

function framePath(result) {
  const topic = encodeURIComponent(result.source_topic);
  return `/v1/frames/${topic}/${result.source_partition}/${result.source_offset}`;
}

// Returns a promise of the frame's bitmap; concurrent requests for the same
// frame share one fetch.
function fetchFrameBitmap(result) {
  const path = framePath(result);
  const cached = state.frameCache.get(path);
  if (cached) return cached;
  const loading = fetch(path, { headers: authHeaders() }).then(async (response) => {
    if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
    return createImageBitmap(await response.blob());
  });
  state.frameCache.set(path, loading);
  loading.catch(() => state.frameCache.delete(path));
  if (state.frameCache.size > FRAME_CACHE_ENTRIES) {
    const oldest = state.frameCache.keys().next().value;
    state.frameCache.get(oldest).then((bitmap) => bitmap.close(), () => {});
    state.frameCache.delete(oldest);
  }
  return loading;
}

// Run frame fetches at most FRAME_FETCHES at a time: tiles before the
// failures list, and the newest request first within each.
function requestFrame(result, draw, urgent) {
  (urgent ? state.frameQueue.urgent : state.frameQueue.later).push({ result, draw });
  pumpFrames();
}

function nextFrameJob() {
  return state.frameQueue.urgent.pop() || state.frameQueue.later.pop();
}

function pumpFrames() {
  while (state.frameFetchesRunning < FRAME_FETCHES) {
    const job = nextFrameJob();
    if (!job) return;
    if (job.draw.stale && job.draw.stale()) continue;
    state.frameFetchesRunning += 1;
    fetchFrameBitmap(job.result)
      .then((bitmap) => job.draw(bitmap))
      .catch((error) => console.warn("frame fetch failed:", error.message))
      .finally(() => {
        state.frameFetchesRunning -= 1;
        pumpFrames();
      });
  }
}

function drawFrame(canvas, bitmap, result) {
  const context = canvas.getContext("2d");
  context.fillStyle = "#0c0e11";
  context.fillRect(0, 0, canvas.width, canvas.height);

  // Fit the source image into the canvas; boxes are x1 y1 x2 y2 in source
  // pixels, so they take the same scale and offset.
  const scale = Math.min(canvas.width / bitmap.width, canvas.height / bitmap.height);
  const offsetX = (canvas.width - bitmap.width * scale) / 2;
  const offsetY = (canvas.height - bitmap.height * scale) / 2;
  context.drawImage(bitmap, offsetX, offsetY, bitmap.width * scale, bitmap.height * scale);

  context.strokeStyle = BOX_COLOUR;
  context.lineWidth = Math.max(2, canvas.width / 160);
  for (const detection of result.detections) {
    const x = offsetX + detection.x1 * scale;
    const y = offsetY + detection.y1 * scale;
    context.strokeRect(x, y, (detection.x2 - detection.x1) * scale, (detection.y2 - detection.y1) * scale);
    if (canvas.width >= 200) drawLabel(context, canvas, detection, x, y);
  }
  canvas.dataset.frameId = result.frame_id;
  canvas.dataset.boxes = String(result.detections.length);
}

function drawLabel(context, canvas, detection, x, y) {
  const textHeight = Math.max(10, Math.round(canvas.width / 28));
  context.font = `${textHeight}px system-ui, sans-serif`;
  const label = `${detection.class_name} ${detection.confidence.toFixed(2)}`;
  const textWidth = context.measureText(label).width;
  // The label sits above the box, moved inside the canvas at the edges.
  const labelX = Math.max(0, Math.min(x, canvas.width - textWidth - 4));
  context.fillStyle = BOX_COLOUR;
  context.fillRect(labelX, Math.max(0, y - textHeight - 2), textWidth + 4, textHeight + 2);
  context.fillStyle = "#ffffff";
  context.fillText(label, labelX + 2, Math.max(textHeight - 2, y - 4));
}

function showLastFailure(tile, result) {
  tile.lastFail = result;
  const canvas = $(".last-fail", tile.element);
  const draw = (bitmap) => {
    if (tile.lastFail !== result) return;
    drawFrame(canvas, bitmap, result);
    const classes = result.detections.map((d) => d.class_name).join(", ");
    $(".last-fail-caption", tile.element).textContent =
      `${result.camera_id} at ${formatTime(result.captured_at_ns)}: ${classes || "failed"}`;
  };
  draw.stale = () => tile.lastFail !== result;
  requestFrame(result, draw, true);
}

// --- failures list -------------------------------------------------------

function formatTime(nanoseconds) {
  return new Date(nanoseconds / 1e6).toLocaleTimeString();
}

function addFailure(result) {
  const list = $("#failures");
  const item = $("#failure-template").content.firstElementChild.cloneNode(true);
  item.dataset.frameId = result.frame_id;
  item.dataset.line = result.line_id;
  $(".failure-line", item).textContent = result.line_id;
  $(".failure-camera", item).textContent = result.camera_id;
  const time = $("time", item);
  time.dateTime = new Date(result.captured_at_ns / 1e6).toISOString();
  time.textContent = formatTime(result.captured_at_ns);
  $(".failure-classes", item).textContent =
    result.detections.map((d) => `${d.class_name} ${d.confidence.toFixed(2)}`).join(", ") || "failed";
  const thumb = $(".thumb", item);
  thumb.addEventListener("click", () => openAnnotated(result));
  list.prepend(item);
  while (list.children.length > MAX_FAILURES) list.lastElementChild.remove();
  const draw = (bitmap) => drawFrame(thumb, bitmap, result);
  // Only the newest entries get a thumbnail; older ones are skipped when
  // the fetch queue falls behind.
  draw.stale = () => !item.isConnected || [...list.children].indexOf(item) >= FAILURE_THUMBNAILS;
  requestFrame(result, draw, false);
}

async function openAnnotated(result) {
  const response = await fetch(`${framePath(result)}?annotated=1`, { headers: authHeaders() });
  if (!response.ok) {
    window.alert(`annotated frame not available: HTTP ${response.status} ${await response.text()}`);
    return;
  }
  window.open(URL.createObjectURL(await response.blob()), "_blank");
}

// --- live feed -----------------------------------------------------------

function remember(frameId) {
  if (state.seen.has(frameId)) return false;
  state.seen.add(frameId);
  state.seenOrder.push(frameId);
  if (state.seenOrder.length > SEEN_FRAME_IDS) state.seen.delete(state.seenOrder.shift());
  return true;
}

function onResult(result, backfill) {
  if (!remember(result.frame_id)) return;
  const inferredMs = result.inferred_at_ns / 1e6;
  if (state.newestInferredMs === null || inferredMs > state.newestInferredMs) state.newestInferredMs = inferredMs;
  const tile = tileFor(result.line_id);
  const now = performance.now();
  tile.frames += 1;
  if (!state.chartedLines.has(result.line_id)) refreshChartSoon();
  if (!backfill) tile.arrivals.push(now);
  tile.recent.push({ at: now, fail: result.verdict === "fail" });
  if (result.verdict === "fail") {
    showLastFailure(tile, result);
    addFailure(result);
  }
  updateTileNumbers(tile, now);
}

function onMessage(event) {
  state.lastMessageAt = performance.now();
  const message = JSON.parse(event.data);
  switch (message.type) {
    case "hello":
      state.heartbeatMs = message.heartbeat_s * 1000;
      setConnection("live", "live");
      break;
    case "result":
      onResult(message.result, Boolean(message.backfill));
      break;
    case "missed":
      state.missedTotal += message.count;
      $("#missed").textContent = `missed ${state.missedTotal}`;
      break;
    case "backfill":
    case "heartbeat":
      break;
    default:
      console.warn("unknown message type", message.type);
  }
}

function socketUrl() {
  const url = new URL("/v1/results", window.location.href);
  url.protocol = window.location.protocol === "https:" ? "wss:" : "ws:";
  if (state.lines.length) url.searchParams.set("lines", state.lines.join(","));
  if (state.token) url.searchParams.set("token", state.token);
  if (state.newestInferredMs !== null) {
    url.searchParams.set("since", String(Math.floor(state.newestInferredMs - SINCE_MARGIN_MS)));
  }
  return url;
}

function connect() {
  disconnect();
  setConnection("connecting", "connecting");
  const socket = new WebSocket(socketUrl());
  state.socket = socket;
  socket.onmessage = onMessage;
  socket.onopen = () => {
    state.retryMs = 1000;
    state.lastMessageAt = performance.now();
  };
  socket.onclose = (event) => {
    if (state.socket !== socket) return;
    state.socket = null;
    const final = FINAL_CLOSE_CODES[event.code];
    if (final) {
      setConnection(final[0], `${final[1]} (${event.code}${event.reason ? ": " + event.reason : ""})`);
      return;
    }
    const delay = state.retryMs;
    state.retryMs = Math.min(MAX_RETRY_MS, state.retryMs * 2);
    setConnection("reconnecting", `disconnected (${event.code}); reconnecting in ${Math.round(delay / 1000)} s`);
    state.retryTimer = setTimeout(connect, delay);
  };
  // Heartbeats arrive every heartbeat_s when nothing else does; after three
  // missed ones the connection is dead even if the browser has not noticed.
  state.watchdog = setInterval(() => {
    if (socket.readyState === WebSocket.OPEN && performance.now() - state.lastMessageAt > 3 * state.heartbeatMs) {
      socket.close(4000, "no heartbeat");
    }
  }, 1000);
}

function disconnect() {
  clearTimeout(state.retryTimer);
  clearInterval(state.watchdog);
  if (state.socket) {
    const socket = state.socket;
    state.socket = null;
    socket.close(1000, "dashboard reconnects");
  }
}

// --- defect rate chart ---------------------------------------------------

async function refreshChart() {
  const end = Date.now();
  let body;
  try {
    body = await getJson("/v1/defect-rate", {
      lines: state.lines.join(","),
      start: String(end - CHART_RANGE_MS),
      end: String(end),
    });
  } catch (error) {
    console.warn("defect rate query failed:", error.message);
    return;
  }
  state.chartedLines = new Set(Object.keys(body.lines));
  for (const line of state.chartedLines) tileFor(line);
  drawChart(body.lines, end - CHART_RANGE_MS, end);
}

// The sink stores results about once a second, so a line that is not in the
// chart yet gets there soon after its first result instead of at the next
// regular refresh.
function refreshChartSoon() {
  if (state.chartSoonTimer !== null) return;
  state.chartSoonTimer = setTimeout(() => {
    state.chartSoonTimer = null;
    refreshChart();
  }, CHART_NEW_LINE_DELAY_MS);
}

const CHART_LEFT = 48;
const CHART_RIGHT_MARGIN = 8;
const CHART_TOP_MARGIN = 8;
const CHART_BOTTOM_MARGIN = 24;

function drawChart(perLine, startMs, endMs) {
  const canvas = $("#chart");
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, canvas.width, canvas.height);
  let highest = 0;
  for (const buckets of Object.values(perLine)) {
    for (const bucket of buckets) highest = Math.max(highest, bucket.defect_rate);
  }
  // The axis ends at the next whole 10 % above the highest rate.
  const maxRate = Math.min(1, Math.ceil(highest * 10 + 1e-9) / 10);
  const plot = {
    left: CHART_LEFT,
    right: canvas.width - CHART_RIGHT_MARGIN,
    top: CHART_TOP_MARGIN,
    bottom: canvas.height - CHART_BOTTOM_MARGIN,
    startMs,
    endMs,
    maxRate,
  };
  drawChartAxes(context, canvas, plot);

  const legend = $("#chart-legend");
  legend.replaceChildren();
  let points = 0;
  for (const [line, buckets] of Object.entries(perLine).sort()) {
    const colour = lineColour(line);
    drawChartSeries(context, plot, buckets, colour);
    points += buckets.length;
    const entry = document.createElement("span");
    entry.style.setProperty("--swatch", colour);
    entry.textContent = line;
    legend.append(entry);
  }
  canvas.dataset.points = String(points);
}

function drawChartAxes(context, canvas, plot) {
  context.strokeStyle = "#3a414c";
  context.fillStyle = "#9aa3ad";
  context.font = "11px system-ui, sans-serif";
  context.lineWidth = 1;
  for (let step = 0; step <= 4; step += 1) {
    const y = plot.bottom - (step / 4) * (plot.bottom - plot.top);
    context.beginPath();
    context.moveTo(plot.left, y);
    context.lineTo(plot.right, y);
    context.stroke();
    const percent = (((plot.maxRate * step) / 4) * 100).toFixed(1).replace(/\.0$/, "");
    context.fillText(`${percent} %`, 4, y + 4);
  }
  for (let minutesAgo = 60; minutesAgo >= 0; minutesAgo -= 15) {
    const x = plot.left + ((CHART_RANGE_MS - minutesAgo * 60000) / CHART_RANGE_MS) * (plot.right - plot.left);
    context.fillText(minutesAgo ? `-${minutesAgo} min` : "now", x - 16, canvas.height - 6);
  }
}

function drawChartSeries(context, plot, buckets, colour) {
  context.strokeStyle = colour;
  context.fillStyle = colour;
  context.lineWidth = 2;
  context.beginPath();
  buckets.forEach((bucket, index) => {
    // Plot each bucket at the middle of its minute.
    const at = bucket.minute_s * 1000 + 30000;
    const x = plot.left + ((at - plot.startMs) / (plot.endMs - plot.startMs)) * (plot.right - plot.left);
    const y = plot.bottom - (bucket.defect_rate / plot.maxRate) * (plot.bottom - plot.top);
    if (index === 0) context.moveTo(x, y);
    else context.lineTo(x, y);
    context.fillRect(x - 2, y - 2, 4, 4);
  });
  context.stroke();
}

// --- start ---------------------------------------------------------------

async function loadLines() {
  if (state.lines.length) {
    state.lines.forEach(tileFor);
    return;
  }
  try {
    const body = await getJson("/v1/lines");
    body.lines.forEach(tileFor);
  } catch (error) {
    console.warn("listing lines failed:", error.message);
  }
}

function start() {
  state.token = $("#token").value.trim();
  state.lines = $("#lines").value.split(",").map((line) => line.trim()).filter(Boolean);
  if (state.token) localStorage.setItem("faultline.token", state.token);
  else localStorage.removeItem("faultline.token");
  state.newestInferredMs = null;
  connect();
  loadLines();
  refreshChart();
  clearInterval(state.chartTimer);
  state.chartTimer = setInterval(refreshChart, CHART_REFRESH_MS);
}

function init() {
  const params = new URLSearchParams(window.location.search);
  $("#token").value = params.get("token") || localStorage.getItem("faultline.token") || "";
  $("#lines").value = params.get("lines") || "";
  if (params.has("token")) {
    // Keep the token out of the address bar and the browser history.
    params.delete("token");
    const query = params.toString();
    window.history.replaceState(null, "", window.location.pathname + (query ? `?${query}` : ""));
  }
  $("#settings").addEventListener("submit", (event) => {
    event.preventDefault();
    start();
  });
  setInterval(refreshTiles, 1000);
  start();
}

init();
