"""LoRA libraries on S3: `SDFARM_LORA_DIR=s3://bucket/prefix` lists the prefix (names, families,
from ranged reads of each header), a job naming one validates at submit and renders the pixels
a folder's copy renders, a worker downloads each object once into a disk cache bounded in bytes
and again when its ETag changes; a missing object fails, a store that is down hands back."""

from __future__ import annotations

import re
import secrets
import time
from pathlib import Path
from typing import Any

import boto3
import httpx
import numpy as np
import pytest

from producer.client import FarmClient
from producer.processes import free_port
from producer.services import S3Service
from producer.submit import validate_jobs
from shared.config import Settings
from shared.errors import InvalidJob, StorageError
from shared.lora_library import LoraLibrary
from shared.lora_s3 import MAX_HEADER_BYTES, S3LoraLibrary, open_lora_library
from shared.s3_storage import S3Storage
from tests.fixtures_farm import FarmEnv
from tests.test_samplers import ROW, difference
from worker.lora_downloads import LoraDownloads
from worker.loras import LoraCache
from worker.models import LoadedModel, load_model
from worker.sampler import PassParams, render_pass
from worker.tiny_lora import make_tiny_lora

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PARAMS = PassParams(steps=3, width=64, height=64, scheduler="lms")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A local library of two tiny kohya LoRAs, `ink` and `oil`."""
    root = tmp_path_factory.mktemp("loras")
    for seed, name in enumerate(("ink", "oil")):
        make_tiny_lora(tiny_model_dir, root / f"{name}.safetensors", layout="kohya", seed=seed)
    return root


@pytest.fixture
def s3(s3_service: S3Service, monkeypatch: pytest.MonkeyPatch) -> S3Service:
    """The session's store, with its credentials where boto3 looks for them."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_service.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_service.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_service.region)
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # it caches the credentials it read
    return s3_service


@pytest.fixture
def prefix() -> str:
    return f"loras-{secrets.token_hex(4)}"


def upload(s3: S3Service, key: str, data: bytes) -> None:
    s3.client().put_object(Bucket=s3.bucket, Key=key, Body=data)


def library_at(s3: S3Service, prefix: str, *, list_interval_s: float = 3600) -> S3LoraLibrary:
    library = open_lora_library(
        f"s3://{s3.bucket}/{prefix}", endpoint_url=s3.endpoint_url, list_interval_s=list_interval_s
    )
    assert isinstance(library, S3LoraLibrary)
    return library


def s3_cache(library: S3LoraLibrary, root: Path, max_bytes: int = 10**9) -> LoraCache:
    return LoraCache(library, 10**9, LoraDownloads(library.storage, root, max_bytes))


def render(cache: LoraCache, model: LoadedModel, name: str) -> np.ndarray:
    cache.activate(model, ((name, 1.0),))
    image = render_pass(model, [ROW], PARAMS).images[0]
    assert image is not None
    return image


def test_loras_uploaded_under_the_prefix_are_listed_with_their_family(
    s3: S3Service, prefix: str, folder: Path
) -> None:
    # Given two LoRAs under the prefix, a file that is not one, and one in a subfolder
    for name in ("ink", "oil"):
        upload(s3, f"{prefix}/{name}.safetensors", (folder / f"{name}.safetensors").read_bytes())
    upload(s3, f"{prefix}/notes.txt", b"not a LoRA")
    upload(s3, f"{prefix}/old/ink-v0.safetensors", (folder / "ink.safetensors").read_bytes())
    # When the library lists the prefix
    found = library_at(s3, prefix).snapshot()
    # Then it holds the two LoRAs by stem, with their family, size and object
    assert sorted(found) == ["ink", "oil"]
    ink = found["ink"]
    assert (ink.family, ink.layout) == ("sd1", "kohya")
    assert ink.size_bytes == (folder / "ink.safetensors").stat().st_size
    assert ink.url == f"s3://{s3.bucket}/{prefix}/ink.safetensors" and ink.etag


def test_an_upload_is_found_without_a_restart_and_a_huge_header_is_skipped(
    s3: S3Service, prefix: str, folder: Path
) -> None:
    # Given a library listed while its prefix was empty, listed again only hourly
    library = library_at(s3, prefix, list_interval_s=3600)
    assert library.names() == []
    # When a LoRA is uploaded, and an object claiming a header above the cap
    upload(s3, f"{prefix}/late.safetensors", (folder / "ink.safetensors").read_bytes())
    too_big = (MAX_HEADER_BYTES + 1).to_bytes(8, "little") + b"{}"
    upload(s3, f"{prefix}/huge.safetensors", too_big)
    # Then the next lookup finds the LoRA, and the other is not in the library
    assert library.get("late") is not None
    assert library.names() == ["late"]


def test_a_job_naming_an_s3_lora_validates_and_renders_the_folders_pixels(
    s3: S3Service, prefix: str, folder: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Given the same LoRA in a folder and on S3, and a model for each library
    upload(s3, f"{prefix}/ink.safetensors", (folder / "ink.safetensors").read_bytes())
    library = library_at(s3, prefix)
    settings = Settings(models={"tiny": str(tiny_model_dir)}, lora_dir=f"s3://{s3.bucket}/{prefix}")
    # When a job names it at submit, and each library's worker side renders it
    (spec,) = validate_jobs(
        [{"prompt": "a fox <lora:ink:1>"}], settings, families={"tiny": "sd1"}, loras=library
    )
    from_s3 = s3_cache(library, tmp_path / "cache")
    from_folder = LoraCache(LoraLibrary(folder), 10**9)
    s3_model, folder_model = (load_model(n, str(tiny_model_dir)) for n in ("s3", "folder"))
    image = render(from_s3, s3_model, "ink")
    reference = render(from_folder, folder_model, "ink")
    # Then the job is valid, and the images and A1111 hashes are the same
    assert [lora.name for lora in spec.loras] == ["ink"]
    assert difference(image, reference) == 0
    assert from_s3.activate(s3_model, (("ink", 1.0),)) == from_folder.activate(
        folder_model, (("ink", 1.0),)
    )


def test_a_second_render_and_a_restarted_worker_do_not_download_again(
    s3: S3Service, prefix: str, folder: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Given a LoRA on S3 and a worker that rendered with it once
    upload(s3, f"{prefix}/ink.safetensors", (folder / "ink.safetensors").read_bytes())
    library = library_at(s3, prefix)
    cache = s3_cache(library, tmp_path / "cache")
    model = load_model("first", str(tiny_model_dir))
    render(cache, model, "ink")
    # When it renders with it again, and a new process with the same cache folder does
    render(cache, model, "ink")
    restarted = s3_cache(library_at(s3, prefix), tmp_path / "cache")
    render(restarted, load_model("second", str(tiny_model_dir)), "ink")
    # Then only the first render downloaded it; the restarted one loaded the file on disk
    assert cache.counts()["lora_downloads"] == 1 and cache.counts()["lora_hits"] == 1
    assert restarted.counts()["lora_downloads"] == 0 and restarted.counts()["lora_loads"] == 1


def test_a_changed_object_is_downloaded_and_loaded_again(
    s3: S3Service, prefix: str, folder: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Given a worker that rendered with `ink`
    key = f"{prefix}/ink.safetensors"
    upload(s3, key, (folder / "ink.safetensors").read_bytes())
    library = library_at(s3, prefix, list_interval_s=0)  # every lookup lists (a test's pace)
    cache = s3_cache(library, tmp_path / "cache")
    model = load_model("changing", str(tiny_model_dir))
    before = render(cache, model, "ink")
    # When the object is overwritten with other bytes (oil's) and `ink` is rendered again
    upload(s3, key, (folder / "oil.safetensors").read_bytes())
    after = render(cache, model, "ink")
    # Then it was downloaded and loaded again: the image is oil's, and one file is on disk
    reference = render(
        LoraCache(LoraLibrary(folder), 10**9), load_model("oil", str(model.path)), "oil"
    )
    assert difference(after, reference) == 0 and difference(after, before) > 0
    assert cache.counts()["lora_downloads"] == 2 and cache.counts()["lora_loads"] == 2
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1


def test_downloaded_files_stay_within_the_byte_budget_least_recently_used_out_first(
    s3: S3Service, prefix: str, folder: Path, tmp_path: Path
) -> None:
    # Given a download cache with room for one of two LoRAs of about the same size
    for name in ("ink", "oil"):
        upload(s3, f"{prefix}/{name}.safetensors", (folder / f"{name}.safetensors").read_bytes())
    library = library_at(s3, prefix)
    size = max(f.size_bytes for f in library.snapshot().values())
    downloads = LoraDownloads(library.storage, tmp_path / "cache", max_bytes=size + size // 2)
    # When the worker needs ink, ink, oil, then ink again
    files = [library.get(name) for name in ("ink", "ink", "oil", "ink")]
    paths = [downloads.local_path(lora)[0] for lora in files if lora is not None]
    # Then each switch downloaded and deleted the other; only ink's file is left
    assert downloads.counts() == {"lora_downloads": 3, "lora_download_evictions": 2}
    assert list((tmp_path / "cache").glob("*.safetensors")) == [paths[-1]]
    assert paths[-1].read_bytes() == (folder / "ink.safetensors").read_bytes()


def test_an_unknown_lora_is_refused_at_submit_with_the_names_on_s3(
    s3: S3Service, prefix: str, folder: Path, tiny_model_dir: Path
) -> None:
    # Given a library of ink and oil on S3
    for name in ("ink", "oil"):
        upload(s3, f"{prefix}/{name}.safetensors", (folder / f"{name}.safetensors").read_bytes())
    settings = Settings(models={"tiny": str(tiny_model_dir)})
    # When a job names a LoRA the prefix lacks
    with pytest.raises(InvalidJob) as refused:
        validate_jobs([{"prompt": "a fox <lora:clay:1>"}], settings, loras=library_at(s3, prefix))
    # Then the refusal names the field, the LoRA and what the library holds
    assert refused.value.details[0]["field"] == "loras.0.name"
    assert "unknown LoRA 'clay'; the library holds: ink, oil" in str(refused.value)


def test_a_missing_object_is_invalid_and_a_store_that_is_down_is_a_storage_error(
    s3: S3Service, prefix: str, folder: Path, tmp_path: Path
) -> None:
    # Given a LoRA listed on S3, then deleted
    key = f"{prefix}/ink.safetensors"
    upload(s3, key, (folder / "ink.safetensors").read_bytes())
    library = library_at(s3, prefix)
    ink = library.get("ink")
    assert ink is not None
    s3.client().delete_object(Bucket=s3.bucket, Key=key)
    # When a worker downloads it, Then it is the job's problem (invalid input) ...
    with pytest.raises(InvalidJob, match=r"LoRA 'ink': s3://.*ink.safetensors is no longer"):
        LoraDownloads(library.storage, tmp_path / "a", 10**9).local_path(ink)
    # ... but a store that does not answer is the store's (the jobs are handed back)
    down = S3Storage(s3.bucket, prefix, endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageError, match="could not read"):
        LoraDownloads(down, tmp_path / "b", 10**9).local_path(ink)
    assert not list((tmp_path / "b").iterdir())  # no .part file left behind


def test_lora_dir_takes_a_folder_or_an_s3_prefix_and_refuses_other_urls() -> None:
    assert Settings(lora_dir="s3://bucket/loras").lora_dir == "s3://bucket/loras"
    assert Settings(lora_dir="/srv/loras").lora_dir == Path("/srv/loras")
    with pytest.raises(ValueError, match="must be a folder or s3://bucket/prefix"):
        Settings(lora_dir="https://example.com/loras")


def _metric(api_url: str, name: str) -> int:
    text = httpx.get(f"{api_url}/metrics").text
    found = re.findall(rf"^sdfarm_worker_{name}\{{[^}}]*\}} ([0-9.]+)$", text, re.MULTILINE)
    return sum(int(float(value)) for value in found)


def test_a_farm_with_an_s3_library_renders_with_an_uploaded_lora_and_downloads_it_once(
    farm_env: FarmEnv, serve_api: Any, prefix: str, folder: Path, tmp_path: Path
) -> None:
    # Given a farm whose library is an S3 prefix, and a LoRA uploaded after it started
    env = farm_env.env
    lora_dir = f"{farm_env.settings.storage_url.rsplit('/', 1)[0]}/{prefix}"
    farm_env.start_worker(
        extra_env={"SDFARM_LORA_DIR": lora_dir, "SDFARM_LORA_DISK_CACHE_DIR": str(tmp_path / "c")}
    )
    api_url = serve_api(farm_env.settings.model_copy(update={"lora_dir": lora_dir}))
    farm_env.wait_for_workers(1)
    client = boto3.client(
        "s3",
        endpoint_url=farm_env.settings.s3_endpoint_url,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    bucket = lora_dir.removeprefix("s3://").partition("/")[0]
    client.put_object(
        Bucket=bucket,
        Key=f"{prefix}/ink.safetensors",
        Body=(folder / "ink.safetensors").read_bytes(),
    )
    # When two batches name it
    base = {"model": "tiny", "width": 64, "height": 64, "steps": 2, "prompt": "a fox <lora:ink:1>"}
    with FarmClient(api_url) as farm:
        for seed in (1, 2):
            batch_id = farm.submit(jobs=[{**base, "seed": seed}])["batch_id"]
            status = farm.wait(batch_id, poll_s=0.2, timeout_s=300)
            assert status["counts"]["succeeded"] == 1, status
            (record,) = farm.jobs(batch_id)
            assert list(record["result"]["loras"]) == ["ink"], record
    # Then the worker downloaded it once and loaded it once
    deadline = time.monotonic() + 30
    while _metric(api_url, "lora_hits") < 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _metric(api_url, "lora_downloads") == 1
    assert _metric(api_url, "lora_loads") == 1
