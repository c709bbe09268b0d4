// The gallery and the image viewer. Thumbnails (small WebPs) fill the gallery; the full image is
// fetched only when one is opened. Uses `api`, `getJson` and `el` from app.js (loaded after this
// file; nothing here runs before app.js calls it).
"use strict";

const GALLERY_BATCHES = 6; // newest batches whose images are shown
const GALLERY_PER_BATCH = 100;

const gallerySeen = {
  jobs: new Map(), // job id -> job (as /v1/batches/{id}/jobs gave it), for the viewer
  figures: new Map(), // job id -> figure element, so a poll never reloads a thumbnail
  doneBatches: new Set(), // ended batches whose images are all shown already
};

// Presigned URL (S3), else the bytes through the API with the key, shown as a blob (file://).
async function imageSource(url, path) {
  if (url) return url;
  const blob = await (await api(path)).blob();
  return URL.createObjectURL(blob);
}

function thumbnailSource(job) {
  const hasThumb = job.result && job.result.thumbnail_key;
  if (!hasThumb) return imageSource(job.image_url, `/v1/jobs/${job.job_id}/image`);
  return imageSource(job.thumbnail_url, `/v1/jobs/${job.job_id}/thumbnail`);
}

async function drawGallery(batches) {
  const gallery = document.getElementById("gallery");
  const shown = batches.filter((b) => b.counts.succeeded > 0).slice(0, GALLERY_BATCHES);
  for (const batch of shown) {
    if (gallerySeen.doneBatches.has(batch.batch_id)) continue;
    const page = await getJson(`/v1/batches/${batch.batch_id}/jobs?state=succeeded&presign=true`
      + `&limit=${GALLERY_PER_BATCH}`);
    const fresh = page.jobs.filter((job) => !gallerySeen.figures.has(job.job_id));
    const figures = fresh.map((job) => galleryFigure(job));
    gallery.prepend(...figures);
    await Promise.all(fresh.map(async (job, i) => {
      figures[i].querySelector("img").src = await thumbnailSource(job);
    }));
    const ended = batch.counts.queued + batch.counts.running === 0;
    if (ended && (page.jobs.length >= batch.counts.succeeded || page.next_cursor !== null)) {
      gallerySeen.doneBatches.add(batch.batch_id);
    }
  }
}

function galleryFigure(job) {
  // The prompt is the hover title; everything else is in the viewer.
  const img = el("img", { alt: job.spec.prompt, title: job.spec.prompt,
    "data-job-id": job.job_id, loading: "lazy" });
  const figure = el("figure", { "data-job-id": job.job_id, "data-batch-id": job.batch_id,
    tabindex: "0", role: "button" }, img,
  el("figcaption", { text: `seed ${job.spec.seed} · ${job.spec.prompt}` }));
  figure.addEventListener("click", () => openViewer(job.job_id).catch(showError));
  figure.addEventListener("keydown", (event) => {
    if (event.key === "Enter") openViewer(job.job_id).catch(showError);
  });
  gallerySeen.jobs.set(job.job_id, job);
  gallerySeen.figures.set(job.job_id, figure);
  return figure;
}

// What the viewer lists, in A1111's order; the infotext below holds all of it.
const VIEWER_FIELDS = [
  ["prompt", (j) => j.spec.prompt],
  ["negative prompt", (j) => j.spec.negative_prompt || ""],
  ["seed", (j) => j.spec.seed],
  ["steps", (j) => j.spec.steps],
  ["sampler", (j) => j.spec.scheduler],
  ["CFG scale", (j) => j.spec.guidance],
  ["size", (j) => `${j.spec.width}×${j.spec.height}`],
  ["model", (j) => j.spec.model + (j.model_hash ? ` [${j.model_hash}]` : "")],
  ["format", (j) => (j.result && j.result.format) || "png"],
  ["worker", (j) => j.worker || ""],
];

async function openViewer(jobId) {
  const job = gallerySeen.jobs.get(jobId);
  const viewer = document.getElementById("viewer");
  viewer.dataset.jobId = jobId;
  document.getElementById("viewer-title").textContent = jobId;
  const rows = VIEWER_FIELDS.map(([name, value]) => el("tr", {},
    el("th", { text: name }), el("td", { text: String(value(job)) })));
  document.querySelector("#viewer-params tbody").replaceChildren(...rows);
  document.getElementById("viewer-infotext").value = job.infotext || "";
  const image = document.getElementById("viewer-image");
  image.alt = job.spec.prompt;
  image.removeAttribute("src");
  if (!viewer.open) viewer.showModal();
  const source = await imageSource(job.image_url, `/v1/jobs/${jobId}/image`);
  image.src = source;
  const download = document.getElementById("viewer-download");
  download.href = source;
  download.download = `${jobId}.${(job.result && job.result.format) || "png"}`;
}

async function copyInfotext() {
  const text = document.getElementById("viewer-infotext");
  const button = document.getElementById("viewer-copy");
  try {
    await navigator.clipboard.writeText(text.value);
  } catch (_) {
    text.select(); // no clipboard permission: leave it selected for Ctrl+C
    document.execCommand("copy");
  }
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = "Copy infotext"; }, 1500);
}

document.getElementById("viewer-copy").addEventListener("click", copyInfotext);
document.getElementById("viewer-close").addEventListener("click", () => {
  document.getElementById("viewer").close();
});
