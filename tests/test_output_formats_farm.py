"""Output formats through a real farm: jobs in PNG, WebP and JPEG, submitted through the API,
rendered by a worker process, stored in S3 (SeaweedFS) with their thumbnails, and read back by
sd-parsers, the manifest, `GET /v1/jobs/{id}/image` and `sdfarm fetch`."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
from PIL import Image
from sd_parsers import ParserManager

from producer.client import FarmClient
from producer.download import fetch_batch
from producer.services import S3Service
from tests.fixtures_farm import FarmEnv

SMALL = {"width": 64, "height": 64, "steps": 3, "model": "tiny"}
JOBS = [
    {"prompt": "a png lighthouse", "seed": 31, "output_format": "png"},
    {"prompt": "a lossless webp heron", "seed": 32},  # the batch's default format
    {"prompt": "a lossy webp fox", "seed": 33, "quality": 70},
    {"prompt": "a jpeg owl", "seed": 34, "output_format": "jpeg", "quality": 85},
]
EXPECTED = [("png", "image/png"), ("webp", "image/webp"), ("webp", "image/webp")]
EXPECTED += [("jpg", "image/jpeg")]


def test_jobs_in_each_format_are_stored_with_their_metadata_type_and_thumbnail(
    farm_env: FarmEnv, serve_api, s3_service: S3Service, tmp_path: Path
) -> None:
    # Given a farm whose worker makes 32 px thumbnails, and a batch whose jobs ask for each format
    # (WebP and the guidance from the batch's defaults)
    farm_env.start_worker(extra_env={"SDFARM_THUMBNAIL_PX": "32"})
    api_url = serve_api(farm_env.settings)
    farm_env.wait_for_workers(1)
    with FarmClient(api_url) as client:
        submitted = client.submit(
            jobs=JOBS, defaults={**SMALL, "guidance": 6.0, "output_format": "webp"}
        )
        status = client.wait(submitted["batch_id"], poll_s=0.2, timeout_s=300)
        records = [client.job(job_id) for job_id in submitted["job_ids"]]
        assert status["counts"]["succeeded"] == len(JOBS), [r.get("error") for r in records]
        manifest = {line["job_id"]: line for line in client.manifest(submitted["batch_id"])}
        served = [_served(client, record["job_id"]) for record in records]
        fetched = fetch_batch(client, submitted["batch_id"], tmp_path / "out")
    bucket = s3_service.client()
    for record, job, (extension, mime), (served_type, served_bytes) in zip(
        records, JOBS, EXPECTED, served, strict=True
    ):
        result = record["result"]
        # Then the image's key, stored Content-Type and the record follow the job's format
        assert result["key"].endswith(f"/{record['job_id']}.{extension}")
        stored = bucket.get_object(Bucket=s3_service.bucket, Key=result["key"])
        data = stored["Body"].read()
        assert (stored["ContentType"], result["content_type"]) == (mime, mime)
        assert result["bytes"] == len(data)
        # And sd-parsers reads the prompt, seed, steps and CFG back from the stored object
        info = ParserManager().parse(io.BytesIO(data))
        assert info is not None, result["key"]
        assert [p.value for p in info.prompts] == [job["prompt"]]
        params = info.samplers[0].parameters
        assert (params["seed"], params["steps"], params["cfg_scale"]) == (
            str(job["seed"]),
            "3",
            "6",
        )
        # And the image route serves it with its own Content-Type
        assert (served_type, served_bytes) == (mime, data)
        # And its WebP thumbnail lies beside it, recorded in the job and the manifest
        thumb_key = result["thumbnail_key"]
        assert thumb_key.endswith(f"/thumbs/{record['job_id']}.webp")
        thumb = bucket.get_object(Bucket=s3_service.bucket, Key=thumb_key)
        assert thumb["ContentType"] == "image/webp"
        with Image.open(io.BytesIO(thumb["Body"].read())) as small:
            assert (small.format, small.size) == ("WEBP", (32, 32))
        line = manifest[record["job_id"]]
        assert (line["format"], line["content_type"]) == (record["spec"]["output_format"], mime)
        assert (line["key"], line["thumbnail_key"]) == (result["key"], thumb_key)
    # And `sdfarm fetch` names each file with its format's extension
    assert [path.name for path in fetched.images] == [
        f"{record['job_id']}.{extension}"
        for record, (extension, _) in sorted(
            zip(records, EXPECTED, strict=True), key=lambda pair: f"{pair[0]['job_id']}"
        )
    ]


def _served(client: FarmClient, job_id: str) -> tuple[str, bytes]:
    """What `GET /v1/jobs/{id}/image` leads to: a presigned S3 URL, followed."""
    response = client.http.get(f"/v1/jobs/{job_id}/image")
    assert response.status_code == 307, response.text
    image = httpx.get(response.headers["location"])
    return image.headers["content-type"], image.content
