// The queue panel: per model, the jobs waiting now and images per minute over the last hour,
// drawn as inline SVG from GET /v1/stats/throughput (the farm's own numbers, no chart library).
// Uses `getJson` and `el` from app.js.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const CHART_W = 360;
const CHART_H = 120;
const CHART_PAD = 4;
const CHART_EVERY_MS = 10000; // the counts are per minute: no need to read them every poll
const LINE_COLOURS = ["#3b7dd8", "#2e9d5b", "#c8423b", "#9b59b6", "#e08e0b", "#16a2b8"];

let chartReadAt = 0;

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  return node;
}

async function drawQueue(force = false) {
  if (!force && Date.now() - chartReadAt < CHART_EVERY_MS) return;
  chartReadAt = Date.now();
  const stats = await getJson("/v1/stats/throughput");
  drawQueueTable(stats.models);
  drawChart(stats.models);
}

function drawQueueTable(models) {
  const body = document.querySelector("#queue tbody");
  body.replaceChildren(...models.map((m, i) => el("tr", { "data-model": m.model },
    el("td", {}, legendSwatch(i), m.model),
    el("td", { class: "queued", text: String(m.queued) }),
    el("td", { text: String(m.dispatched_chunks) }),
    el("td", { text: String(m.images_per_minute.reduce((a, b) => a + b, 0)) }),
    el("td", { text: m.images_per_s.toFixed(3) }),
  )));
  if (!models.length) {
    body.append(el("tr", {}, el("td", { colspan: "5", class: "empty", text: "No models." })));
  }
}

function legendSwatch(index) {
  const swatch = el("span", { class: "swatch" });
  swatch.style.background = LINE_COLOURS[index % LINE_COLOURS.length]; // CSSOM, CSP-safe
  return swatch;
}

// One polyline per model, a point per minute (oldest left); y from 0 to the busiest minute.
function drawChart(models) {
  const chart = document.getElementById("throughput-chart");
  const peak = Math.max(1, ...models.flatMap((m) => m.images_per_minute));
  const parts = [svg("line", { x1: CHART_PAD, y1: CHART_H - CHART_PAD, x2: CHART_W - CHART_PAD,
    y2: CHART_H - CHART_PAD, class: "axis" })];
  models.forEach((model, index) => {
    const counts = model.images_per_minute;
    const step = (CHART_W - 2 * CHART_PAD) / Math.max(1, counts.length - 1);
    const points = counts.map((count, i) => {
      const x = CHART_PAD + i * step;
      const y = CHART_H - CHART_PAD - ((CHART_H - 2 * CHART_PAD) * count) / peak;
      return `${x.toFixed(1)},${y.toFixed(1)}`;
    });
    const line = svg("polyline", { points: points.join(" "), fill: "none", "stroke-width": 2,
      stroke: LINE_COLOURS[index % LINE_COLOURS.length], "data-model": model.model,
      "data-points": counts.length });
    const title = svg("title");
    title.textContent = `${model.model}: ${counts.reduce((a, b) => a + b, 0)} images this hour`;
    line.append(title);
    parts.push(line);
  });
  const label = svg("text", { x: CHART_PAD + 2, y: CHART_PAD + 10, class: "peak" });
  label.textContent = `peak ${peak}/min`;
  parts.push(label);
  chart.replaceChildren(...parts);
}
