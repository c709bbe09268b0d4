"""The dashboard's gallery, viewer, filters, queue chart and workers, in a real headless Chromium
against a real farm rendering on the tiny model. Screenshots of the gallery and of an opened image
are left in tests/artifacts/ (and in $SDFARM_TEST_ARTIFACTS when set), with the bytes the page
downloaded for its images against the bytes of the full images (gallery-bytes.txt)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from producer.client import FarmClient
from shared.metadata import read_png_metadata
from tests import test_dashboard
from tests.fixtures_farm import FarmEnv
from tests.test_dashboard import ARTIFACTS, CHROMIUM_ARGS, _fail_as_a_worker_would

chromium = test_dashboard.chromium  # the same fixture: Debian's chromium, skipped off CI

KEY = "dashboard-gallery-key"
GALLERY_JOBS = int(os.environ.get("SDFARM_GALLERY_JOBS", "12"))  # 100 for the closing figure
# SD's usual size, its thumbnail a quarter of the pixels (thumbnail_px 256, the default).
IMAGE = {"width": 512, "height": 512, "steps": 1}


def test_the_gallery_shows_thumbnails_opens_an_image_filters_and_charts_the_queue(
    farm_env: FarmEnv, serve_api: Any, chromium: str
) -> None:
    from playwright.sync_api import expect, sync_playwright

    # Given a keyed farm whose worker rendered a batch, and a batch whose job failed
    settings = farm_env.settings.model_copy(update={"api_keys": [KEY]})
    farm_env.start_worker()
    url = serve_api(settings)
    farm_env.wait_for_workers(1)
    client = FarmClient(url, KEY)
    prompts = [f"a {'red' if i % 2 else 'green'} lantern number {i}" for i in range(GALLERY_JOBS)]
    done = client.submit(prompts=prompts, defaults=IMAGE)
    client.wait(done["batch_id"], poll_s=0.3, timeout_s=600)
    broken = client.submit(prompts=["a melting clock"], defaults={**IMAGE, "steps": 2})
    _fail_as_a_worker_would(settings.redis_url, broken["job_ids"][0])
    jobs = client.http.get(
        f"/v1/batches/{done['batch_id']}/jobs", params={"limit": 1000, "state": "succeeded"}
    ).json()["jobs"]
    assert len(jobs) == GALLERY_JOBS
    assert all(job["result"]["thumbnail_key"] for job in jobs)  # every job has its thumbnail

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        image_bytes: dict[str, int] = {}
        page.on("requestfinished", lambda r: _count_image(r, image_bytes))
        page.goto(url)
        page.evaluate(f"localStorage.setItem('sdfarm.apiKey', {KEY!r})")
        page.reload()
        # When the gallery loads, Then every image is its WebP thumbnail, from S3
        gallery = page.locator("#gallery img[data-job-id]")
        expect(gallery).to_have_count(GALLERY_JOBS, timeout=30_000)
        # (scrolled to the end first: the gallery's images load lazily; and a function, not a
        # bare expression, which the page's CSP would refuse to eval while polling)
        page.locator("#gallery img").last.scroll_into_view_if_needed()
        page.wait_for_function(
            "() => [...document.querySelectorAll('#gallery img')]"
            ".every(i => i.naturalWidth === 256)",
            timeout=60_000,
        )
        first = gallery.first
        src = first.get_attribute("src") or ""
        assert "/thumbs/" in src and ".webp" in src and "X-Amz-Expires" in src
        # And hovering one shows its prompt
        job_id = first.get_attribute("data-job-id")
        job = next(j for j in jobs if j["job_id"] == job_id)
        first.hover()
        assert first.get_attribute("title") == job["spec"]["prompt"]
        # And the queue panel charts the last hour, a point a minute, and the worker is listed
        line = page.locator('#throughput-chart polyline[data-model="tiny"]')
        expect(line).to_have_attribute("data-points", "60", timeout=15_000)
        assert len((line.get_attribute("points") or "").split()) == 60
        expect(page.locator('#queue tr[data-model="tiny"]')).to_have_count(1)
        worker = page.locator("#workers tr[data-worker-id]")
        expect(worker).to_have_count(1)
        expect(worker.locator("td").nth(1)).to_have_text("cpu")
        expect(worker.locator("td").nth(2)).to_contain_text("tiny")
        expect(worker.locator("td.current")).to_have_text("idle")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "gallery.png"), full_page=True)
        thumbs_downloaded = sum(image_bytes.values())

        # When an image is clicked, Then the viewer shows it full size with its parameters
        first.click()
        viewer = page.locator("#viewer")
        expect(viewer).to_be_visible()
        expect(viewer.locator("#viewer-title")).to_have_text(job_id or "")
        expect(viewer.locator("#viewer-params")).to_contain_text(str(job["spec"]["seed"]))
        page.wait_for_function("() => document.getElementById('viewer-image').naturalWidth === 512")
        # And the infotext to copy is the one embedded in the image itself
        shown = viewer.locator("#viewer-infotext").input_value()
        assert shown == read_png_metadata(_image(client, job_id or ""))["parameters"]
        assert f"Seed: {job['spec']['seed']}" in shown
        # And a download link to the full image, named after the job
        download = viewer.locator("#viewer-download")
        assert f"{job_id}.png" in (download.get_attribute("href") or "")
        assert download.get_attribute("download") == f"{job_id}.png"
        page.screenshot(path=str(ARTIFACTS / "viewer.png"))
        viewer.locator("#viewer-close").click()
        expect(viewer).to_be_hidden()

        # When the state filter picks failed, Then only the failed batch shows, and no image
        page.select_option("#state-filter", "failed")
        rows = page.locator("#batches .batch:visible")
        expect(rows).to_have_count(1)
        assert rows.first.get_attribute("data-batch-id") == broken["batch_id"]
        expect(page.locator("#gallery figure:visible")).to_have_count(0)
        # When the search names a prompt word, Then only the matching images and batch show
        page.select_option("#state-filter", "")
        page.fill("#search", "green")
        greens = sum(1 for p in prompts if "green" in p)
        expect(page.locator("#gallery figure:visible")).to_have_count(greens)
        expect(page.locator("#batches .batch:visible")).to_have_count(1)
        # And searching a batch id shows that batch alone
        page.fill("#search", broken["batch_id"])
        expect(page.locator("#batches .batch:visible")).to_have_count(1)
        expect(page.locator("#gallery figure:visible")).to_have_count(0)
        browser.close()
    client.close()

    # And the screenshots are left, and the gallery cost a fraction of the full images' bytes
    assert all((ARTIFACTS / name).stat().st_size > 10_000 for name in ("gallery.png", "viewer.png"))
    full = sum(int(j["result"]["bytes"]) for j in jobs)
    assert 0 < thumbs_downloaded < full / 2
    _leave_artifacts(
        f"{GALLERY_JOBS} images of {IMAGE['width']}x{IMAGE['height']}, thumbnails 256 px:\n"
        f"before (full images, as the gallery loaded them): {full} bytes\n"
        f"after (thumbnails): {thumbs_downloaded} bytes\n"
    )


def _count_image(request: Any, seen: dict[str, int]) -> None:
    """Bytes of each image body the page fetched (thumbnails here, until the viewer opens)."""
    if request.resource_type == "image" and "/thumbs/" in request.url:
        seen[request.url.split("?")[0]] = request.sizes()["responseBodySize"]


def _image(client: FarmClient, job_id: str) -> bytes:
    response = client.http.get(f"/v1/jobs/{job_id}/image", follow_redirects=True)
    response.raise_for_status()
    return response.content


def _leave_artifacts(figures: str) -> None:
    (ARTIFACTS / "gallery-bytes.txt").write_text(figures)
    target = os.environ.get("SDFARM_TEST_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        for name in ("gallery.png", "viewer.png", "gallery-bytes.txt"):
            shutil.copy(ARTIFACTS / name, Path(target) / name)
