"""The dashboard in a real headless Chromium against a real farm: it shows the workers and a
finished batch's images (from S3, through presigned URLs), failures with their reasons, and its
cancel button cancels a queued batch. A screenshot is left in tests/artifacts/."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from producer.client import FarmClient
from shared.jobs import JobState
from shared.ledger import Ledger
from tests.fixtures_farm import FarmEnv

KEY = "dashboard-test-key"
ARTIFACTS = Path(__file__).parent / "artifacts"
SMALL = {"width": 64, "height": 64, "steps": 4}
# Debian's chromium runs as root in CI containers; no GPU, no calls home.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail("chromium is missing (CI is set): apt-get install -y chromium")
        pytest.skip("chromium is not installed: apt-get install -y chromium")
    return path


def test_the_dashboard_shows_images_failures_workers_and_cancels_a_queued_batch(
    farm_env: FarmEnv,
    serve_api,
    chromium: str,
) -> None:
    from playwright.sync_api import expect, sync_playwright

    # Given a keyed farm with one worker that has rendered a batch of two
    settings = farm_env.settings.model_copy(update={"api_keys": [KEY]})
    farm_env.start_worker()
    url = serve_api(settings)
    farm_env.wait_for_workers(1)
    client = FarmClient(url, KEY)
    done = client.submit(prompts=["a red fox in snow", "a blue whale"], defaults=SMALL)
    client.wait(done["batch_id"], poll_s=0.2, timeout_s=180)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        # When someone opens the page, it asks for the key; they enter it
        page.goto(url)
        expect(page.locator("#status")).to_contain_text("enter an API key")
        page.fill("#api-key", KEY)
        page.click("#login button[type=submit]")
        # Then the finished batch's two images load, from S3, 64 pixels wide
        gallery = page.locator("#gallery img[data-job-id]")
        expect(gallery).to_have_count(2, timeout=15_000)
        page.wait_for_function(
            "() => [...document.querySelectorAll('#gallery img')].every(i => i.naturalWidth === 64)"
        )
        assert {gallery.nth(i).get_attribute("data-job-id") for i in range(2)} == set(
            done["job_ids"]
        )
        assert "X-Amz-Expires" in (gallery.first.get_attribute("src") or "")
        # And the worker is listed, and the batch shows as succeeded with a full bar
        expect(page.locator("#workers tr[data-worker-id]")).to_have_count(1)
        finished = page.locator(f'[data-batch-id="{done["batch_id"]}"]')
        expect(finished.locator(".batch-state")).to_have_text("succeeded")
        # And the key is kept in the browser, never in the URL
        assert KEY not in page.url
        assert page.evaluate("localStorage.getItem('sdfarm.apiKey')") == KEY

        # Given no worker, a batch waiting in the queue, and a batch whose job failed
        farm_env.stop_workers()
        queued = client.submit(prompts=[f"a lantern {i}" for i in range(3)], defaults=SMALL)
        broken = client.submit(prompts=["a melting clock"], defaults=SMALL)
        _fail_as_a_worker_would(settings.redis_url, broken["job_ids"][0])
        # When the queued batch's cancel button is clicked (twice: it asks first)
        row = page.locator(f'[data-batch-id="{queued["batch_id"]}"]')
        expect(row.locator(".batch-state")).to_have_text("queued", timeout=10_000)
        row.locator("button.cancel").click()
        expect(row.locator("button.cancel")).to_have_text("Really cancel?")
        row.locator("button.cancel").click()
        # Then the batch shows cancelled, and the ledger agrees
        expect(row.locator(".batch-state")).to_have_text("cancelled", timeout=10_000)
        assert client.batch(queued["batch_id"])["counts"]["cancelled"] == 3
        # And the failure is listed with its reason
        failure = page.locator(f'#failures li[data-job-id="{broken["job_ids"][0]}"]')
        expect(failure).to_contain_text("render failed: CUDA out of memory", timeout=10_000)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        browser.close()
    client.close()
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000


def _fail_as_a_worker_would(redis_url: str, job_id: str) -> None:
    import redis

    ledger = Ledger(redis.Redis.from_url(redis_url), status_ttl_s=3600, lease_s=30)
    ledger.force(job_id, [JobState.QUEUED], JobState.RUNNING, {"worker": "w-gone"})
    ledger.force(
        job_id, [JobState.RUNNING], JobState.FAILED, {"error": "render failed: CUDA out of memory"}
    )
    ledger.redis.close()
