// The sdfarm dashboard: polls the API and draws batches, failures and workers; gallery.js draws
// the gallery and viewer, chart.js the queue chart. Plain JavaScript, no build step. The API key is kept in localStorage and sent only in the
// Authorization header. Every user-supplied text (prompts, errors) goes in through textContent,
// never innerHTML.
"use strict";

const KEY_STORAGE = "sdfarm.apiKey";
const POLL_MS = 2000;
const BATCHES_SHOWN = 50;
const FAILURES_PER_BATCH = 5;
const ARM_MS = 4000; // a cancel button must be clicked twice within this time

const seen = {
  failures: new Map(), // job id -> list item
};

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  const key = apiKey();
  if (key) headers.Authorization = "Bearer " + key;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (!response.ok) {
    let message = response.statusText;
    try {
      message = (await response.json()).error || message;
    } catch (_) {
      // not JSON: keep the status text
    }
    throw new ApiError(response.status, message);
  }
  return response;
}

async function getJson(path) {
  return (await api(path)).json();
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function batchState(batch) {
  const c = batch.counts;
  if (c.queued + c.running > 0) return c.running > 0 ? "running" : "queued";
  if (batch.cancelled_at && c.cancelled > 0) return "cancelled";
  if (c.failed > 0) return "failed";
  return "succeeded";
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "ETA unknown";
  if (seconds < 90) return `ETA ${Math.round(seconds)} s`;
  if (seconds < 5400) return `ETA ${Math.round(seconds / 60)} min`;
  return `ETA ${(seconds / 3600).toFixed(1)} h`;
}

function progressBar(batch) {
  const bar = el("div", { class: "bar", role: "progressbar" });
  const done = batch.counts.succeeded + batch.counts.failed + batch.counts.cancelled;
  bar.setAttribute("aria-valuemax", String(batch.total));
  bar.setAttribute("aria-valuenow", String(done));
  for (const state of ["succeeded", "failed", "cancelled", "running"]) {
    const share = batch.total ? (100 * batch.counts[state]) / batch.total : 0;
    if (share === 0) continue;
    const span = el("span", { class: state });
    span.style.width = `${share}%`; // CSSOM: the page's CSP refuses inline style attributes
    bar.append(span);
  }
  return bar;
}

function actionButton(batch) {
  const c = batch.counts;
  if (c.queued + c.running > 0) {
    const button = el("button", { class: "cancel", type: "button", text: "Cancel" });
    button.addEventListener("click", () => armed(button, "Really cancel?", async () => {
      await api(`/v1/batches/${batch.batch_id}`, { method: "DELETE" });
    }));
    return button;
  }
  if (c.failed + c.cancelled > 0) {
    const button = el("button", { class: "retry", type: "button", text: "Retry" });
    button.addEventListener("click", () => armed(button, "Really retry?", async () => {
      await api(`/v1/batches/${batch.batch_id}/retry`, { method: "POST" });
    }));
    return button;
  }
  return "";
}

// Two clicks: the first arms the button, the second (within ARM_MS) acts.
function armed(button, question, action) {
  if (!button.classList.contains("armed")) {
    const label = button.textContent;
    button.classList.add("armed");
    button.textContent = question;
    setTimeout(() => {
      button.classList.remove("armed");
      button.textContent = label;
    }, ARM_MS);
    return;
  }
  button.disabled = true;
  action().then(refresh, showError);
}

function drawBatches(batches) {
  const box = document.getElementById("batches");
  if (!batches.length) {
    box.replaceChildren(el("p", { class: "empty", text: "No batches yet." }));
    return;
  }
  // Keep a batch's row (and an armed button) when nothing about it changed.
  const rows = batches.map((batch) => {
    const signature = JSON.stringify([batch.counts, batch.eta_s, batch.cancelled_at]);
    const old = box.querySelector(`[data-batch-id="${batch.batch_id}"]`);
    if (old && old.dataset.signature === signature) return old;
    const state = batchState(batch);
    const c = batch.counts;
    const done = c.succeeded + c.failed + c.cancelled;
    const head = el(
      "div",
      { class: "batch-head" },
      el("span", { class: "batch-id", text: batch.batch_id }),
      el("span", { class: `batch-state ${state}`, text: state }),
      el("span", { text: `priority ${batch.priority ?? "-"}` }),
      el("span", { text: new Date(batch.created_at * 1000).toLocaleString() }),
      el("span", { class: "eta", text: state === "running" || state === "queued"
        ? duration(batch.eta_s) : "" }),
      actionButton(batch),
    );
    const counts = el("div", {
      class: "counts",
      text: `${done}/${batch.total} done: ${c.succeeded} succeeded, ${c.running} running, `
        + `${c.queued} queued, ${c.failed} failed, ${c.cancelled} cancelled`
        + (batch.queue_position ? ` · ${batch.queue_position} jobs ahead` : ""),
    });
    const row = el("div", { class: "batch", "data-batch-id": batch.batch_id },
      head, progressBar(batch), counts);
    row.dataset.signature = signature;
    row.dataset.state = state;
    return row;
  });
  box.replaceChildren(...rows);
}

async function drawFailures(batches) {
  const list = document.getElementById("failures");
  for (const batch of batches.filter((b) => b.counts.failed > 0).slice(0, GALLERY_BATCHES)) {
    const page = await getJson(`/v1/batches/${batch.batch_id}/jobs?state=failed`
      + `&limit=${FAILURES_PER_BATCH}`);
    for (const job of page.jobs) {
      if (seen.failures.has(job.job_id)) continue;
      const item = el("li", { "data-job-id": job.job_id },
        el("code", { text: job.job_id }), " ",
        el("span", { class: "reason", text: job.error || "failed" }));
      seen.failures.set(job.job_id, item);
      list.prepend(item);
    }
  }
}

// A worker's chunk: its first job id and how many more (only the caller's own jobs are listed).
function currentChunk(jobIds) {
  if (!jobIds.length) return "idle";
  return jobIds.length === 1 ? jobIds[0] : `${jobIds[0]} +${jobIds.length - 1}`;
}

function drawWorkers(workers) {
  const body = document.querySelector("#workers tbody");
  body.replaceChildren(...workers.map((w) => el("tr", { "data-worker-id": w.worker_id },
    el("td", { text: w.worker_id }),
    el("td", { text: w.device || "" }),
    el("td", { text: (w.models || []).join(", ") }),
    el("td", { text: String(w.images_done) }),
    el("td", { text: w.images_per_s.toFixed(2) }),
    el("td", { class: "current", text: currentChunk(w.current || []) }),
  )));
  if (!workers.length) {
    body.append(el("tr", {}, el("td", { colspan: "6", class: "empty", text: "No live workers." })));
  }
}

function showError(error) {
  const status = document.getElementById("status");
  status.classList.add("error");
  status.textContent = error.status === 401
    ? `${error.message}: enter an API key above`
    : `error: ${error.message}`;
}

let polling = false;
async function refresh() {
  if (polling) return;
  polling = true;
  try {
    const [listing, workers] = await Promise.all([
      getJson(`/v1/batches?limit=${BATCHES_SHOWN}`),
      getJson("/v1/workers"),
    ]);
    drawBatches(listing.batches);
    applyFilter(); // fresh rows come in unfiltered
    drawWorkers(workers.workers);
    await drawGallery(listing.batches);
    await drawFailures(listing.batches);
    await drawQueue();
    applyFilter();
    const status = document.getElementById("status");
    status.classList.remove("error");
    status.textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    showError(error);
  } finally {
    polling = false;
  }
}

// State filter and search, over what the page has loaded: a batch matches the search by its id
// or by the prompt of any of its jobs shown in the gallery or failures; an image, by its job id
// or prompt.
function applyFilter() {
  const state = document.getElementById("state-filter").value;
  const query = document.getElementById("search").value.trim().toLowerCase();
  const prompts = new Map(); // batch id -> prompts the page knows
  for (const job of gallerySeen.jobs.values()) {
    const list = prompts.get(job.batch_id) || [];
    list.push(job.spec.prompt.toLowerCase());
    prompts.set(job.batch_id, list);
  }
  const states = new Map(); // batch id -> its state, for the batches listed
  for (const row of document.querySelectorAll("#batches .batch")) {
    const id = row.dataset.batchId;
    states.set(id, row.dataset.state);
    const found = !query || id.toLowerCase().includes(query)
      || (prompts.get(id) || []).some((p) => p.includes(query));
    row.hidden = !(found && (!state || row.dataset.state === state));
  }
  for (const [jobId, figure] of gallerySeen.figures) {
    const job = gallerySeen.jobs.get(jobId);
    const found = !query || jobId.toLowerCase().includes(query)
      || job.spec.prompt.toLowerCase().includes(query);
    figure.hidden = !found || (state !== "" && states.get(job.batch_id) !== state);
  }
}

document.getElementById("state-filter").addEventListener("change", applyFilter);
document.getElementById("search").addEventListener("input", applyFilter);
document.getElementById("login").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = document.getElementById("api-key");
  localStorage.setItem(KEY_STORAGE, input.value.trim());
  input.value = "";
  refresh();
});
document.getElementById("forget").addEventListener("click", () => {
  localStorage.removeItem(KEY_STORAGE);
  refresh();
});

refresh();
setInterval(refresh, POLL_MS);
