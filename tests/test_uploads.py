"""Init images stored once, referenced, and bounded: POST /v1/uploads, base64 images stored at
submit, s3:// keys held to the farm's uploads and the operator's prefixes, decompression bombs
refused at the door. Against the real API, Redis and SeaweedFS."""

from __future__ import annotations

import base64
import io
import random
import secrets
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from PIL import Image

from producer.client import FarmClient
from producer.services import S3Service
from shared.ids import new_batch_id
from shared.jobs import JobSpec
from shared.keys import Keys
from shared.ledger import Ledger
from tests.fixtures_api import Api

SIZED = {"width": 96, "height": 96, "steps": 2}
ALPHA, BETA = "alpha-key-" + "a" * 24, "beta-key-" + "b" * 24


def noise_png(side: int = 96, seed: int = 0) -> bytes:
    """A PNG of random pixels: ~28 KB for 96 px, as big as a real init image of that size."""
    rng = random.Random(seed)
    pixels = bytes(rng.getrandbits(8) for _ in range(side * side * 3))
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), pixels).save(out, "PNG")
    return out.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` pixels and holds none (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    body = struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + body + end


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def upload(
    api: Api, data: bytes, content_type: str = "image/png", headers: dict[str, str] | None = None
) -> Any:
    sent = {"Content-Type": content_type, **(headers or {})}
    return api.http.post("/v1/uploads", content=data, headers=sent)


def uploaded_keys(s3: S3Service, api: Api) -> list[str]:
    prefix = api.settings.storage_url.removeprefix(f"s3://{s3.bucket}/")
    listing = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=f"{prefix}/uploads/")
    return [item["Key"] for item in listing.get("Contents", [])]


def test_the_same_bytes_uploaded_twice_are_one_object_and_one_reference(
    api: Api, s3_service: S3Service
) -> None:
    # Given a PNG
    image = noise_png()
    # When it is uploaded as a raw body, again, and as a multipart form
    first = upload(api, image)
    second = upload(api, image)
    form = api.http.post("/v1/uploads", files={"file": ("cat.png", image, "image/png")})
    # Then the first stored it, and all three name the same reference
    assert first.status_code == 201, first.text
    assert (second.status_code, form.status_code) == (200, 200), (second.text, form.text)
    body = first.json()
    assert body["ref"] == second.json()["ref"] == form.json()["ref"]
    assert body["ref"].startswith("upload:default/sha256:") and body["stored"] is True
    assert (body["format"], body["width"], body["height"], body["bytes"]) == (
        "PNG",
        96,
        96,
        len(image),
    )
    # And the store holds one object, with those bytes
    (key,) = uploaded_keys(s3_service, api)
    stored = s3_service.client().get_object(Bucket=s3_service.bucket, Key=key)["Body"].read()
    assert stored == image and key.endswith(body["sha256"])


def test_a_job_naming_an_upload_keeps_the_reference(api: Api) -> None:
    ref = upload(api, noise_png()).json()["ref"]
    response = api.http.post(
        "/v1/batches", json={"jobs": [{"prompt": "x", **SIZED, "init_image": ref}]}
    )
    assert response.status_code == 201, response.text
    (job_id,) = response.json()["job_ids"]
    assert api.http.get(f"/v1/jobs/{job_id}").json()["spec"]["init_image"] == ref


def test_3000_jobs_sharing_a_base64_image_store_one_image_and_small_records(
    api: Api, s3_service: S3Service, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given 3,000 prompts sharing one 96 px base64 PNG in `defaults`
    image = noise_png()
    defaults = {**SIZED, "init_image": b64(image)}
    client = redis.Redis.from_url(redis_url)
    # When they are submitted
    response = api.http.post(
        "/v1/batches",
        json={"prompts": [f"a cat {i}" for i in range(3000)], "defaults": defaults},
        timeout=300,
    )
    # Then the farm stored one image, and every job names it by reference
    assert response.status_code == 201, response.text
    job_ids = response.json()["job_ids"]
    (key,) = uploaded_keys(s3_service, api)
    sample = job_ids[:: len(job_ids) // 20]
    specs = [api.http.get(f"/v1/jobs/{job_id}").json()["spec"] for job_id in sample]
    refs = {spec["init_image"] for spec in specs}
    assert len(refs) == 1 and refs.pop().endswith(key.rsplit("/", 1)[1])
    # And a job record is small: far below what one costs holding the base64 itself (written
    # straight to the ledger, as submit did before)
    after = _bytes_per_job(client, sample)
    old = Ledger(client, status_ttl_s=3600, lease_s=30).create_batch(
        new_batch_id(),
        [
            JobSpec.model_validate({"prompt": f"cat {i}", **defaults, "seed": i, "model": "tiny"})
            for i in range(20)
        ],
    )
    before = _bytes_per_job(client, old)
    with capsys.disabled():
        print(f"\n  Redis bytes per job record: {before} with base64 inline, {after} by reference")
    assert after < 2000 and before > 20 * after, (before, after)
    client.close()


def _bytes_per_job(client: redis.Redis, job_ids: list[str]) -> int:
    keys = Keys()
    sizes = [client.memory_usage(keys.job(job_id), samples=0) or 0 for job_id in job_ids]
    return sum(sizes) // len(sizes)


def test_a_decompression_bomb_is_a_422_as_base64_and_as_an_upload(api: Api) -> None:
    # Given a 45-byte PNG whose header claims 20000x20000 pixels
    bomb = png_header(20000, 20000)
    # When it is sent as a job's base64 init image, and uploaded
    as_job = api.http.post("/v1/batches", json={"jobs": [{"prompt": "x", "init_image": b64(bomb)}]})
    as_upload = upload(api, bomb)
    # Then both are 422s that say what it claims and what is allowed
    assert as_job.status_code == 422, as_job.text
    problem = as_job.json()["problems"][0]
    assert problem["field"] == "init_image" and "more pixels than 4096x4096" in problem["message"]
    assert as_upload.status_code == 422, as_upload.text
    assert "20000x20000" in as_upload.json()["error"]


def test_the_pixel_and_byte_settings_bound_uploads_and_base64_images(start_api: Any) -> None:
    # Given a farm that allows 64x64 pixels and 20 KB an init image
    api = start_api(init_image_max_pixels=64 * 64, init_image_max_bytes=20_000)
    small, big = noise_png(64), noise_png(96)  # ~12 KB and ~28 KB
    # When a 64 px image is uploaded, Then it is stored
    assert upload(api, small).status_code == 201
    # When a 96 px PNG is uploaded or sent as base64
    over = upload(api, big)
    job = {"prompt": "x", **SIZED, "init_image": b64(big)}
    as_job = api.http.post("/v1/batches", json={"jobs": [job]})
    # Then the upload is a 413 naming the byte setting, the job a 422 naming the bound it broke
    assert over.status_code == 413 and "init_image_max_bytes" in over.json()["error"]
    assert as_job.status_code == 422, as_job.text
    assert "init_image_max_bytes" in as_job.json()["problems"][0]["message"]
    # And an image within the bytes but over the pixels is a 422 naming the pixel setting
    wide = io.BytesIO()
    Image.new("RGB", (128, 128)).save(wide, "PNG")  # a few hundred bytes, 16,384 pixels
    refused = upload(api, wide.getvalue())
    assert refused.status_code == 422 and "init_image_max_pixels" in refused.json()["error"]


def test_what_is_not_a_png_or_jpeg_is_refused_at_upload(api: Api) -> None:
    assert upload(api, b"GIF89a not really").status_code == 422
    assert upload(api, b"x", content_type="image/gif").status_code == 415
    two = {name: (f"{name}.png", noise_png(8), "image/png") for name in ("a", "b")}
    unclear = api.http.post("/v1/uploads", files=two)  # two images, neither named `file`
    assert unclear.status_code == 422 and "`file`" in unclear.json()["error"]


def test_a_foreign_s3_key_is_refused_with_one_message_whether_missing_or_present(
    start_api: Callable[..., Api], s3_service: S3Service
) -> None:
    # Given a farm that allows one operator prefix, and a bucket holding a PNG and a text file
    # outside it
    bucket = s3_service.bucket
    folder = f"private-{secrets.token_hex(4)}"
    s3 = s3_service.client()
    s3.put_object(Bucket=bucket, Key=f"{folder}/cat.png", Body=noise_png())
    s3.put_object(Bucket=bucket, Key=f"{folder}/notes.txt", Body=b"not an image")
    api = start_api(init_image_prefixes=f"s3://{bucket}/inputs-{secrets.token_hex(4)}/")
    messages = []
    # When jobs name the PNG, the text file and a key that does not exist
    for name in ("cat.png", "notes.txt", "nowhere.png"):
        ref = f"s3://{bucket}/{folder}/{name}"
        response = api.http.post(
            "/v1/batches", json={"jobs": [{"prompt": "x", **SIZED, "init_image": ref}]}
        )
        assert response.status_code == 422, response.text
        messages.append(response.json()["error"].replace(ref, "REF"))
    # Then each is refused with the same message, which says what is allowed
    assert len(set(messages)) == 1, messages
    assert "cannot be read by the farm" in messages[0]
    assert "SDFARM_INIT_IMAGE_PREFIXES" in messages[0] and "/v1/uploads" in messages[0]


def test_a_tenant_cannot_name_another_tenants_upload_even_knowing_its_digest(
    start_api: Callable[..., Api],
) -> None:
    # Given two tenants, and an image alpha uploaded
    api = start_api(api_keys=f"alpha:{ALPHA},beta:{BETA}")
    image = noise_png(seed=7)
    alpha = {"Authorization": f"Bearer {ALPHA}"}
    beta = {"Authorization": f"Bearer {BETA}"}
    ref = upload(api, image, headers=alpha).json()["ref"]
    assert ref.startswith("upload:alpha/")
    # When beta names alpha's upload, and an alpha upload that does not exist
    missing = f"upload:alpha/sha256:{'0' * 64}"
    answers = []
    for named in (ref, missing):
        job = {"prompt": "x", **SIZED, "init_image": named}
        response = api.http.post("/v1/batches", json={"jobs": [job]}, headers=beta)
        assert response.status_code == 422, response.text
        answers.append(response.json()["error"].replace(named, "REF"))
    # Then both are the same refusal
    assert answers[0] == answers[1] and "its own uploads" in answers[0]
    # And beta uploading the same bytes gets its own reference, stored now (nothing says that
    # alpha holds them)
    own = upload(api, image, headers=beta)
    assert own.status_code == 201 and own.json()["ref"].startswith("upload:beta/")
    assert own.json()["sha256"] in ref


def test_keys_under_the_allowed_prefix_and_own_uploads_folder_are_accepted(
    start_api: Callable[..., Api], s3_service: S3Service
) -> None:
    # Given a farm allowing `inputs-X/`, with a PNG there, and one upload of the caller's
    bucket, inputs = s3_service.bucket, f"inputs-{secrets.token_hex(4)}"
    s3_service.client().put_object(Bucket=bucket, Key=f"{inputs}/cat.png", Body=noise_png())
    api = start_api(init_image_prefixes=f"s3://{bucket}/{inputs}")
    own = upload(api, noise_png(seed=3)).json()
    own_key = f"{api.settings.storage_url}/uploads/default/{own['sha256']}"
    jobs = [
        {"prompt": "x", **SIZED, "init_image": f"s3://{bucket}/{inputs}/cat.png"},
        {"prompt": "x", **SIZED, "init_image": own_key},
    ]
    # When jobs name them, Then they are accepted
    response = api.http.post("/v1/batches", json={"jobs": jobs})
    assert response.status_code == 201, response.text
    # And a key under the allowed prefix that is not there is reported (the operator shares it)
    gone = {"prompt": "x", **SIZED, "init_image": f"s3://{bucket}/{inputs}/gone.png"}
    refused = api.http.post("/v1/batches", json={"jobs": [gone]})
    assert refused.status_code == 422 and "no such object" in refused.json()["error"]
    # And `..` cannot climb out of it
    climb = {"prompt": "x", **SIZED, "init_image": f"s3://{bucket}/{inputs}/../secret.png"}
    assert api.http.post("/v1/batches", json={"jobs": [climb]}).status_code == 422


def test_uploads_work_the_same_with_file_storage(
    start_api: Callable[..., Api], tmp_path: Path
) -> None:
    # Given a farm that stores in a directory
    api = start_api(storage_url=(tmp_path / "store").as_uri())
    image = noise_png(seed=5)
    # When an image is uploaded and a base64 copy of it is submitted
    ref = upload(api, image).json()["ref"]
    job = {"prompt": "x", **SIZED, "init_image": b64(image)}
    response = api.http.post("/v1/batches", json={"jobs": [job]})
    # Then the job names the same upload, one file in the uploads folder
    assert response.status_code == 201, response.text
    (job_id,) = response.json()["job_ids"]
    assert api.http.get(f"/v1/jobs/{job_id}").json()["spec"]["init_image"] == ref
    (stored,) = (tmp_path / "store" / "uploads" / "default").iterdir()
    assert stored.read_bytes() == image


def test_the_client_uploads_a_path_or_bytes(api: Api, tmp_path: Path) -> None:
    path = tmp_path / "cat.png"
    path.write_bytes(noise_png(seed=9))
    with FarmClient(api.url, api_key=api.http.headers["Authorization"].split()[1]) as client:
        assert client.upload(path) == client.upload(path.read_bytes())
        assert client.upload(path).startswith("upload:default/sha256:")
