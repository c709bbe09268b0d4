"""Round trip through a real farm: images the farm made, re-submitted from their own infotexts
(`POST /v1/batches` with `a1111`, and `sdfarm submit --from-png DIR`), render the same pixels.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from producer.client import FarmClient
from producer.services import S3Service
from shared.metadata import read_png_metadata
from tests.fixtures_farm import FarmEnv
from tests.test_cli import sdfarm
from worker.tiny import make_tiny_vae

SMALL = {"width": 64, "height": 64, "steps": 3}


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_vae(tmp_path_factory.mktemp("vaes") / "other", seed=7)


def render(
    client: FarmClient, s3: S3Service, **batch: Any
) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Submit a batch, wait for it, and return its job records and PNGs, in job order."""
    submitted = client.submit(**batch)
    status = client.wait(submitted["batch_id"], poll_s=0.2, timeout_s=300)
    records = [client.job(job_id) for job_id in submitted["job_ids"]]
    assert status["counts"]["succeeded"] == len(records), [r.get("error") for r in records]
    bucket = s3.client()
    pngs = [
        bucket.get_object(Bucket=s3.bucket, Key=r["result"]["key"])["Body"].read() for r in records
    ]
    return records, pngs


def pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


def test_images_resubmitted_from_their_infotexts_through_the_api_render_the_same_pixels(
    farm_env: FarmEnv, serve_api, s3_service: S3Service, vae_dir: Path
) -> None:
    # Given a farm whose worker holds the tiny model and a VAE override, and jobs that use a
    # non-default sampler, a negative prompt, a line break and BREAK, the VAE and clip skip
    farm_env.start_worker(extra_env={"SDFARM_VAES": f"other={vae_dir}"})
    api_url = serve_api(farm_env.settings.model_copy(update={"vaes": {"other": str(vae_dir)}}))
    farm_env.wait_for_workers(1)
    jobs = [
        {"prompt": "a red fox", "negative_prompt": "blurry", "scheduler": "euler_a", "seed": 11},
        {"prompt": "a blue heron\nBREAK at dawn", "scheduler": "dpmpp_2m_karras", "seed": 12},
        {"prompt": "an owl", "scheduler": "ddim", "seed": 13, "guidance": 5.5, "vae": "other"},
        {"prompt": "a hare in snow", "seed": 14, "clip_skip": 2},
    ]
    with FarmClient(api_url) as client:
        records, pngs = render(client, s3_service, jobs=[{**SMALL, **job} for job in jobs])
        texts = [read_png_metadata(png)["parameters"] for png in pngs]
        # When their infotexts are submitted as an `a1111` batch
        again, repngs = render(client, s3_service, a1111=texts)
    # Then every job is the job that made the image, and renders the same pixels
    assert [r["spec"] for r in again] == [r["spec"] for r in records]
    assert "VAE: other" in texts[2] and "Clip skip: 2" in texts[3]
    for first, second in zip(pngs, repngs, strict=True):
        assert np.array_equal(pixels(first), pixels(second))


def test_a_folder_of_20_farm_pngs_resubmitted_with_from_png_reproduces_all_20(
    farm_env: FarmEnv, serve_api, s3_service: S3Service, tmp_path: Path
) -> None:
    # Given 20 images the farm made, saved in a folder
    farm_env.start_worker()
    api_url = serve_api(farm_env.settings)
    farm_env.wait_for_workers(1)
    samplers = ["lms", "euler", "euler_a", "dpmpp_2m", "unipc"]
    jobs = [
        {
            **SMALL,
            "steps": 2,
            "prompt": f"a paper boat, number {i}",
            "negative_prompt": "dark" if i % 2 else "",
            "scheduler": samplers[i % len(samplers)],
            "seed": 1000 + i,
        }
        for i in range(20)
    ]
    folder = tmp_path / "pngs"
    folder.mkdir()
    with FarmClient(api_url) as client:
        _, pngs = render(client, s3_service, jobs=jobs)
        for i, png in enumerate(pngs):
            (folder / f"{i:02d}.png").write_bytes(png)
        # When `sdfarm submit --from-png DIR` re-submits them
        done = sdfarm(api_url, "submit", "--from-png", str(folder))
        assert done.returncode == 0, done.stderr
        batch_id = done.stdout.strip()
        status = client.wait(batch_id, poll_s=0.2, timeout_s=300)
        records = sorted(client.jobs(batch_id), key=lambda r: int(r["job_id"].rsplit("-", 1)[1]))
    # Then all 20 rendered the same pixels as the images they came from
    assert status["counts"]["succeeded"] == 20, status
    bucket = s3_service.client()
    for record, png in zip(records, pngs, strict=True):
        again = bucket.get_object(Bucket=s3_service.bucket, Key=record["result"]["key"])
        assert np.array_equal(pixels(again["Body"].read()), pixels(png)), record["job_id"]


def test_from_png_names_the_file_whose_infotext_it_refuses(
    farm_env: FarmEnv, serve_api, tmp_path: Path
) -> None:
    # Given a folder with a PNG whose infotext asks for hires fix
    api_url = serve_api(farm_env.settings)
    image = Image.new("RGB", (64, 64))
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(
        "parameters",
        "a cat\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Hires upscale: 2",
    )
    image.save(tmp_path / "hires.png", pnginfo=info)
    # When it is re-submitted
    done = sdfarm(api_url, "submit", "--from-png", str(tmp_path))
    # Then the command refuses it (bad input), naming the file and the field
    assert done.returncode == 2, done.stderr
    assert "hires.png" in done.stderr and "Hires upscale" in done.stderr
