"""GET /metrics: the farm in Prometheus format, from the ledger and the worker heartbeats."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.keys import Keys
from shared.ledger.workers import publish_heartbeat
from tests.fixtures_api import Api


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_show_jobs_queues_render_times_worker_rates_and_failure_reasons(api: Api) -> None:
    # Given a worker's heartbeat, and a batch of 6 where it rendered 3 and 1 failed
    publish_heartbeat(
        api.ledger.redis, Keys(), "w-1", {"models": ["tiny"], "images_done": 3}, ttl_s=30
    )
    ids = api.http.post("/v1/batches", json={"prompts": [f"p{i}" for i in range(6)]}).json()
    for job_id, seconds in zip(ids["job_ids"][:3], (0.2, 0.7, 3.0), strict=True):
        api.render_as_worker(job_id, worker="w-1", seconds=seconds)
    api.render_as_worker(ids["job_ids"][3], worker="w-1", fail="render failed: CUDA OOM")
    # When Prometheus scrapes
    response = api.http.get("/metrics")
    # Then it gets the text format with every series the dashboards need
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    s = _samples(response.text)
    assert s[("sdfarm_jobs", (("state", "succeeded"),))] == 3
    assert s[("sdfarm_jobs", (("state", "queued"),))] == 2
    assert s[("sdfarm_jobs", (("state", "failed"),))] == 1
    assert s[("sdfarm_queue_depth", (("model", "tiny"),))] >= 0
    assert s[("sdfarm_render_seconds_count", ())] == 3
    assert s[("sdfarm_render_seconds_sum", ())] == pytest.approx(3.9)
    assert s[("sdfarm_render_seconds_bucket", (("le", "0.25"),))] == 1
    assert s[("sdfarm_render_seconds_bucket", (("le", "1.0"),))] == 2
    assert s[("sdfarm_render_seconds_bucket", (("le", "+Inf"),))] == 3
    assert s[("sdfarm_job_failures_total", (("reason", "render_failed"),))] == 1
    assert s[("sdfarm_jobs_finished_total", (("state", "succeeded"),))] == 3
    assert s[("sdfarm_workers", ())] == 1
    assert s[("sdfarm_worker_images_per_second", (("worker", "w-1"),))] > 0
    assert s[("sdfarm_worker_images_done", (("worker", "w-1"),))] == 3
    assert s[("sdfarm_active_batches", ())] == 1


def test_metrics_need_the_key_like_every_other_read(api: Api) -> None:
    assert httpx.get(f"{api.url}/metrics").status_code == 401
