"""Samplers, img2img (base64 and s3://) and long-prompt warnings through the whole farm.

API -> ledger -> a real worker process -> S3 -> status, and the same job through `sdfarm render`.
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from producer import views
from producer.client import FarmClient
from shared.metadata import read_png_metadata
from tests.fixtures_farm import FarmEnv
from tests.test_img2img import init_picture
from worker.cli import main as worker_cli

LONG = "a photo of a cat, highly detailed, " * 12 + "the moon over a castle"


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_samplers_img2img_and_warnings_reach_s3_and_the_api(
    farm_env: FarmEnv,
    serve_api,
    s3_service,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    # Given a farm with one worker, and an init image already in the farm's bucket
    s3 = s3_service.client()
    init_key = "inputs/red-ball.png"
    s3.put_object(Bucket=s3_service.bucket, Key=init_key, Body=png_bytes(init_picture()))
    farm_env.start_worker(extra_env={"OMP_NUM_THREADS": "1"})  # see one_torch_thread
    api_url = serve_api(farm_env.settings)
    farm_env.wait_for_workers(1)
    base = {"width": 64, "height": 64, "steps": 6, "negative_prompt": "blurry"}
    jobs = [
        {**base, "prompt": "a lighthouse", "scheduler": "euler_a", "seed": 1},
        {**base, "prompt": LONG, "scheduler": "dpmpp_2m_karras", "seed": 2},
        {
            **base,
            "prompt": "a red ball, watercolor",
            "scheduler": "ddim",
            "seed": 3,
            "init_image": base64.b64encode(png_bytes(init_picture())).decode(),
            "strength": 0.5,
        },
        {
            **base,
            "prompt": "a red ball, oil painting",
            "scheduler": "euler",
            "seed": 4,
            "init_image": f"s3://{s3_service.bucket}/{init_key}",
        },
    ]

    # When the four jobs are submitted through the API and rendered
    with FarmClient(api_url) as client:
        submitted = client.submit(jobs=jobs)
        status = client.wait(submitted["batch_id"], poll_s=0.2, timeout_s=300)
        records = [client.job(job_id) for job_id in submitted["job_ids"]]

    # Then all succeeded, and each PNG names its sampler as A1111 does
    assert status["counts"]["succeeded"] == 4, [r.get("error") for r in records]
    pngs = [
        s3.get_object(Bucket=s3_service.bucket, Key=r["result"]["key"])["Body"].read()
        for r in records
    ]
    params = [read_png_metadata(png)["parameters"].split("\n")[-1] for png in pngs]
    for line, sampler in zip(params, ["Euler a", "DPM++ 2M Karras", "DDIM", "Euler"], strict=True):
        assert f"Sampler: {sampler}," in line, line
        assert re.search(r"Model hash: [0-9a-f]{10}, Model: tiny", line), line
    # And the img2img jobs record their denoising strength (0.75 when unset); the others none
    assert [re.findall(r"Denoising strength: ([0-9.]+)", line) for line in params] == [
        [],
        [],
        ["0.5"],
        ["0.75"],
    ]
    # And the PNG does not carry the base64 init image, only its digest (since uploads, the
    # reference to the image stored once at submit: issue 12)
    init_ref = json.loads(read_png_metadata(pngs[2])["sdfarm"])["spec"]["init_image"]
    assert re.fullmatch(r"upload:default/sha256:[0-9a-f]{64}", init_ref), init_ref
    # And the long prompt's dropped words reached the job record, through the API
    assert records[0]["warnings"] == [] and records[2]["warnings"] == []
    (warning,) = records[1]["warnings"]
    assert "the moon over a castle" in warning and "CLIP reads 75" in warning
    # And `sdfarm status JOB` prints it
    assert f"  warning: {warning}" in views.job_text(records[1]).split("\n")

    # When the base64 img2img job is rendered with `sdfarm render`
    init_file = tmp_path / "init.png"
    init_file.write_bytes(png_bytes(init_picture()))
    out = tmp_path / "local.png"
    code = worker_cli(
        "render",
        [
            "--model",
            str(tiny_model_dir),
            "--prompt",
            jobs[2]["prompt"],
            "--negative-prompt",
            "blurry",
            "--seed",
            "3",
            "--steps",
            "6",
            "--width",
            "64",
            "--height",
            "64",
            "--scheduler",
            "ddim",
            "--init-image",
            str(init_file),
            "--strength",
            "0.5",
            "--out",
            str(out),
        ],
    )
    # Then it is the farm's image
    assert code == 0
    local = np.asarray(Image.open(out)).astype(int)
    farm = np.asarray(Image.open(io.BytesIO(pngs[2]))).astype(int)
    assert np.abs(local - farm).max() <= 2
    assert "Denoising strength: 0.5" in read_png_metadata(out.read_bytes())["parameters"]


def test_an_s3_init_image_that_is_not_there_is_refused_at_submit(
    farm_env: FarmEnv,
    serve_api,
    s3_service,
) -> None:
    # Given a farm storing in S3, When a job names an init image its bucket does not hold
    api_url = serve_api(farm_env.settings)
    ref = f"s3://{s3_service.bucket}/inputs/nowhere.png"
    with FarmClient(api_url) as client:
        response = client.http.post(
            "/v1/batches",
            json={
                "jobs": [{"prompt": "x", "width": 64, "height": 64}] * 2
                + [{"prompt": "x", "width": 64, "height": 64, "init_image": ref}]
            },
        )
    # Then it is refused, naming the job, the field and the key
    assert response.status_code == 422, response.text
    problem = response.json()["problems"][0]
    assert (problem["job"], problem["field"]) == (2, "init_image")
    assert ref in problem["message"] and "cannot be read by the farm" in problem["message"]
