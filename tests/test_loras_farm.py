"""A farm with a LoRA library: batches with different LoRA sets, and one without, submitted
together, render in passes that never mix sets, and the worker loads each LoRA once."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import httpx

from producer.client import FarmClient
from shared.metadata import read_png_metadata
from tests.fixtures_farm import FarmEnv
from worker.tiny_lora import make_tiny_lora

JOBS_PER_BATCH = 3
SETS: list[list[dict[str, Any]]] = [
    [{"name": "ink", "weight": 1.0}],
    [{"name": "oil", "weight": 0.8}],
    [{"name": "ink", "weight": 0.5}, {"name": "clay", "weight": 1.0}],
    [],  # the batch without LoRAs
]


def _lora_counts(api_url: str) -> dict[str, int]:
    text = httpx.get(f"{api_url}/metrics").text
    found = re.findall(r"^sdfarm_worker_(lora_\w+)\{[^}]*\} ([0-9.]+)$", text, re.MULTILINE)
    return {name: int(float(value)) for name, value in found}


def test_batches_with_different_lora_sets_never_share_a_pass_and_each_lora_loads_once(
    farm_env: FarmEnv, serve_api, s3_service, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Given a library of three LoRAs and one worker that reads it
    library = tmp_path / "loras"
    for seed, name in enumerate(("ink", "oil", "clay")):
        make_tiny_lora(tiny_model_dir, library / f"{name}.safetensors", layout="kohya", seed=seed)
    farm_env.start_worker(extra_env={"SDFARM_LORA_DIR": str(library)})
    # A wait long enough that the dispatcher sees all four batches before it sends a chunk
    settings = farm_env.settings.model_copy(update={"lora_dir": library, "batch_wait_ms": 1500})
    api_url = serve_api(settings)
    farm_env.wait_for_workers(1)
    base = {"model": "tiny", "width": 64, "height": 64, "steps": 3}
    # When four batches are submitted together: three LoRA sets (one as a tag), and none
    with FarmClient(api_url) as client:
        batches = []
        for index, loras in enumerate(SETS):
            jobs = [
                {**base, "prompt": f"a lighthouse {i}", "seed": i, "loras": loras}
                for i in range(JOBS_PER_BATCH)
            ]
            if index == 0:  # the same set named by the prompt's tag
                jobs = [
                    {**job, "prompt": f"{job['prompt']} <lora:ink:1>", "loras": []} for job in jobs
                ]
            batches.append(client.submit(jobs=jobs)["batch_id"])
        for batch_id in batches:
            status = client.wait(batch_id, poll_s=0.2, timeout_s=300)
            assert status["counts"]["succeeded"] == JOBS_PER_BATCH, status
        records = {batch_id: list(client.jobs(batch_id)) for batch_id in batches}
    # Then every job rendered in a pass with exactly its own LoRA set active, with batch-mates
    # of that set only (a pass holds at most the jobs of one set)
    s3 = s3_service.client()
    for batch_id, loras in zip(batches, SETS, strict=True):
        for record in records[batch_id]:
            active = record["result"].get("loras", {})
            assert sorted(active) == sorted(lora["name"] for lora in loras), record
            assert record["timings"]["batch_rows"] <= JOBS_PER_BATCH, record
            key = record["result"]["key"]
            data = s3.get_object(Bucket=s3_service.bucket, Key=key)["Body"].read()
            parameters = read_png_metadata(data)["parameters"]
            for name, short_hash in active.items():
                assert f"{name}: {short_hash}" in parameters
            assert ("Lora hashes" in parameters) == bool(loras)
    # And the worker's metrics show one load per LoRA (ink's second use a hit)
    deadline = time.monotonic() + 30
    while (counts := _lora_counts(api_url)).get("lora_loads") != 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert counts["lora_loads"] == 3, counts
    assert counts["lora_hits"] >= 1 and counts["lora_evictions"] == 0, counts
