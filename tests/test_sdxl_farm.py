"""A farm whose one worker holds an SD 1.x model and an SDXL model renders a batch mixing both,
through the API, with real worker processes and S3, and each PNG says what rendered it; jobs
with a refiner go only to a worker that holds the base and the refiner."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from producer.client import FarmClient
from shared.metadata import read_png_metadata
from tests.fixtures_farm import FarmEnv


@pytest.fixture(scope="module")
def sdxl_dir(tiny_sdxl_dir: Path) -> Path:
    return tiny_sdxl_dir


def test_one_worker_renders_a_batch_mixing_sd1_and_sdxl_jobs(
    farm_env: FarmEnv, serve_api, s3_service, sdxl_dir: Path, tiny_model_dir: Path
) -> None:
    # Given one worker holding the tiny SD 1.x model as `tiny` and the tiny SDXL as `xl`
    models = {"tiny": str(tiny_model_dir), "xl": str(sdxl_dir)}
    farm_env.start_worker(extra_env={"SDFARM_MODELS": f"tiny={tiny_model_dir},xl={sdxl_dir}"})
    api_url = serve_api(farm_env.settings.model_copy(update={"models": models}))
    farm_env.wait_for_workers(1)
    base = {"width": 64, "height": 64, "steps": 4, "scheduler": "euler"}
    jobs = [
        {**base, "prompt": f"a {thing} in the snow", "model": model, "seed": i}
        for i, (thing, model) in enumerate(
            [("fox", "tiny"), ("fox", "xl"), ("owl", "xl"), ("owl", "tiny"), ("hare", "xl")]
        )
    ]
    jobs[2] |= {"original_width": 1024, "original_height": 1024, "negative_prompt": "blurry"}
    # When the batch is submitted through the API and rendered
    with FarmClient(api_url) as client:
        submitted = client.submit(jobs=jobs)
        status = client.wait(submitted["batch_id"], poll_s=0.2, timeout_s=300)
        records = list(client.jobs(submitted["batch_id"]))
        workers = client.http.get("/v1/workers").json()["workers"]
    # Then every job succeeded, each with its own model's family
    assert status["counts"]["succeeded"] == len(jobs), status
    families = {"tiny": "sd1", "xl": "sdxl"}
    assert [r["model_family"] for r in records] == [families[j["model"]] for j in jobs]
    assert workers[0]["model_families"] == families
    # And each PNG's parameters read back with its prompt, seed and model
    s3 = s3_service.client()
    for record, job in zip(records, jobs, strict=True):
        data = s3.get_object(Bucket=s3_service.bucket, Key=record["result"]["key"])["Body"].read()
        lines = read_png_metadata(data)["parameters"].split("\n")
        assert lines[0] == job["prompt"]
        assert re.search(rf"Seed: {job['seed']}, Size: 64x64, .*Model: {job['model']}$", lines[-1])


def test_refined_jobs_render_only_on_the_worker_holding_the_base_and_the_refiner(
    farm_env: FarmEnv, serve_api, s3_service, sdxl_dir: Path, tiny_refiner_dir: Path
) -> None:
    # Given a worker holding the SDXL base alone, and one holding the base and the refiner
    models = {"xl": str(sdxl_dir), "ref": str(tiny_refiner_dir)}
    farm_env.start_worker(extra_env={"SDFARM_MODELS": f"xl={sdxl_dir}"})
    farm_env.start_worker(extra_env={"SDFARM_MODELS": f"xl={sdxl_dir},ref={tiny_refiner_dir}"})
    api_url = serve_api(farm_env.settings.model_copy(update={"models": models}))
    farm_env.wait_for_workers(2)
    base = {"model": "xl", "width": 64, "height": 64, "steps": 5, "scheduler": "euler"}
    refined = {"refiner": "ref", "refiner_switch_at": 0.7}
    jobs = [
        {**base, **(refined if i % 2 else {}), "prompt": f"a heron {i}", "seed": i}
        for i in range(8)
    ]
    # When the batch is submitted through the API and rendered
    with FarmClient(api_url) as client:
        submitted = client.submit(jobs=jobs)
        status = client.wait(submitted["batch_id"], poll_s=0.2, timeout_s=300)
        records = list(client.jobs(submitted["batch_id"]))
        workers = client.http.get("/v1/workers").json()["workers"]
    # Then every job succeeded, and every refined one on the worker that serves `xl+ref`
    assert status["counts"]["succeeded"] == len(jobs), status
    both = [w["worker_id"] for w in workers if "xl+ref" in w["models"]]
    assert len(both) == 1, workers
    assert {w["model_families"].get("ref") for w in workers} == {None, "sdxl-refiner"}
    s3 = s3_service.client()
    for record, job in zip(records, jobs, strict=True):
        data = s3.get_object(Bucket=s3_service.bucket, Key=record["result"]["key"])["Body"].read()
        settings_line = read_png_metadata(data)["parameters"].split("\n")[-1]
        if "refiner" in job:
            assert record["worker"] == both[0]
            assert record["refiner_hash"], record
            assert re.search(
                r"Refiner: ref \[[0-9a-f]{10}\], Refiner switch at: 0.7$", settings_line
            )
        else:
            assert "Refiner" not in settings_line and record["refiner_hash"] is None
