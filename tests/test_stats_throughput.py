"""GET /v1/stats/throughput (the dashboard's queue chart), GET /v1/jobs/{id}/thumbnail and the
`infotext` of a finished job, against a real API and Redis, a worker played through the ledger."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from producer.routes_stats import MINUTES, per_minute
from shared.jobs import JobState
from tests.fixtures_api import Api

SMALL = {"width": 64, "height": 64, "steps": 4, "seed": 7}


def test_ten_second_buckets_add_up_to_minutes() -> None:
    assert per_minute([1, 0, 2, 0, 0, 3, 4, 4, 0, 0, 0, 0]) == [6, 8]


def test_the_throughput_route_counts_finished_images_per_model_and_minute(api: Api) -> None:
    # Given a batch of three, two of them rendered and one still queued
    done = api.http.post("/v1/batches", json={"prompts": ["a", "b", "c"], "defaults": SMALL})
    job_ids = done.json()["job_ids"]
    before = _tiny(api.http.get("/v1/stats/throughput").json())
    for job_id in job_ids[:2]:
        api.render_as_worker(job_id)
    # When the dashboard reads the farm's throughput
    body = api.http.get("/v1/stats/throughput").json()
    # Then the model shows a point a minute for the last hour, the last minute holding both
    tiny = _tiny(body)
    assert body["minute_s"] == 60
    assert len(tiny["images_per_minute"]) == MINUTES == 60
    assert sum(tiny["images_per_minute"]) == sum(before["images_per_minute"]) + 2
    assert tiny["images_per_minute"][-1] >= 2
    assert tiny["images_per_s"] > 0
    # And its queue depth counts the waiting job (in a lane, or sent to the broker)
    assert tiny["queued"] + tiny["dispatched_chunks"] >= 1


def test_the_throughput_route_needs_a_key(api: Api) -> None:
    import httpx

    assert httpx.get(f"{api.url}/v1/stats/throughput").status_code == 401


def test_a_finished_job_serves_its_thumbnail_and_infotext(
    start_api: Callable[..., Api], tmp_path: Path
) -> None:
    # Given a file:// farm whose job succeeded with a thumbnail stored beside its image
    api = start_api(storage_url=(tmp_path / "store").as_uri())
    job_id = api.http.post("/v1/batches", json={"prompts": ["a moth"], "defaults": SMALL}).json()[
        "job_ids"
    ][0]
    thumb = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(thumb, format="WEBP")
    key = f"thumbs/{job_id}.webp"
    (tmp_path / "store" / "thumbs").mkdir(parents=True)
    (tmp_path / "store" / key).write_bytes(thumb.getvalue())
    # (before it renders, it has none)
    assert api.http.get(f"/v1/jobs/{job_id}/thumbnail").status_code == 404
    api.ledger.force(job_id, [JobState.QUEUED], JobState.RUNNING, {"worker": "w-test"})
    result = {"key": f"{job_id}.png", "bytes": 10, "thumbnail_key": key}
    api.ledger.force(
        job_id, [JobState.RUNNING], JobState.SUCCEEDED, {"result": result, "model_hash": "abc123"}
    )
    # When the dashboard asks for its thumbnail and its view
    response = api.http.get(f"/v1/jobs/{job_id}/thumbnail")
    view = api.http.get(f"/v1/jobs/{job_id}").json()
    # Then the thumbnail comes as WebP bytes, 64 pixels wide
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(response.content)).size == (64, 64)
    # And the view carries A1111's parameters text, with the seed and model hash
    assert view["infotext"].startswith("a moth\n")
    assert "Seed: 7" in view["infotext"] and "Model hash: abc123" in view["infotext"]
    assert "Size: 64x64" in view["infotext"]


def test_a_job_without_a_thumbnail_is_a_404_naming_why(api: Api) -> None:
    job_id = api.http.post("/v1/batches", json={"prompts": ["x"], "defaults": SMALL}).json()[
        "job_ids"
    ][0]
    # Given a job rendered by a worker with thumbnail_px 0: its result names no thumbnail
    api.ledger.force(job_id, [JobState.QUEUED], JobState.RUNNING, {"worker": "w-test"})
    result = {"key": f"x/{job_id}.png", "bytes": 10}
    api.ledger.force(job_id, [JobState.RUNNING], JobState.SUCCEEDED, {"result": result})
    response = api.http.get(f"/v1/jobs/{job_id}/thumbnail")
    assert response.status_code == 404
    assert "thumbnail_px 0" in response.json()["error"]
    assert api.http.get(f"/v1/jobs/{job_id}").json()["infotext"] is not None


def _tiny(body: dict[str, Any]) -> dict[str, Any]:
    models: dict[str, dict[str, Any]] = {m["model"]: m for m in body["models"]}
    return models["tiny"]
