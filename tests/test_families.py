"""A model's family and native size come from the model: they set a sizeless job's size at submit
(where the API can read the folder) and a warning for a size far from it, never a changed size."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from producer.client import FarmClient
from producer.submit import validate_jobs
from shared.config import Settings
from shared.families import native_sizes, read_model_facts
from tests.fixtures_farm import FarmEnv
from worker.models import load_model
from worker.sampler import PassParams, Row, render_pass
from worker.tiny import make_tiny


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("models") / "tiny-sdxl", arch="sdxl")


def test_the_family_and_native_size_are_read_from_the_folder(
    tiny_model_dir: Path, sdxl_dir: Path, tmp_path: Path
) -> None:
    # Given the two tiny models, and an SDXL folder whose U-Net says SDXL 1.0's sample size
    full_size = tmp_path / "sdxl-sized"
    shutil.copytree(sdxl_dir, full_size)
    config_path = full_size / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "sample_size": 128}))
    # When their facts are read, Then each says its family and the size it was trained at
    tiny, xl, big = (read_model_facts(str(p)) for p in (tiny_model_dir, sdxl_dir, full_size))
    assert tiny is not None and (tiny.family, tiny.native_px) == ("sd1", 64)
    assert xl is not None and (xl.family, xl.native_px) == ("sdxl", 64)
    assert big is not None and (big.family, big.native_px) == ("sdxl", 1024)
    # And a path the API cannot read gives nothing, rather than a guess
    assert read_model_facts(str(tmp_path / "elsewhere")) is None
    assert native_sizes({"xl": str(full_size), "remote": "/only/on/workers"}) == {"xl": 1024}


def test_a_job_that_names_no_size_gets_its_models_native_size() -> None:
    settings = Settings(models={"xl": "/x", "sd": "/y", "remote": "/z"})
    sizes = {"xl": 1024, "sd": 512}
    # Given jobs with no size, with only a width, and for a model whose folder is not readable
    jobs = [
        {"prompt": "a fox", "model": "xl"},
        {"prompt": "a fox", "model": "xl", "width": 832},
        {"prompt": "a fox", "model": "remote"},
    ]
    # When they are validated at submit
    specs = validate_jobs(jobs, settings, sizes)
    # Then each gets what it named, and its model's native size for the rest (512 when unknown)
    assert [(s.width, s.height) for s in specs] == [(1024, 1024), (832, 1024), (512, 512)]


def test_a_size_far_from_the_models_native_one_renders_as_asked_with_a_warning(
    tiny_model_dir: Path,
) -> None:
    model = load_model("tiny", str(tiny_model_dir))  # trained (so to speak) at 64x64
    row = Row("a fox", "", 1, 7.5)
    far = render_pass(model, [row], PassParams(2, 256, 256, "euler"))
    near = render_pass(model, [row], PassParams(2, 64, 96, "euler"))
    assert far.images[0] is not None and far.images[0].shape == (256, 256, 3)
    assert any("far from the 64x64 this sd1 model" in w for w in far.warnings[0])
    assert near.warnings[0] == []


def test_the_api_reads_the_models_size_from_its_folder_for_sizeless_jobs(
    farm_env: FarmEnv, serve_api
) -> None:
    # Given an API configured with the tiny model's folder (its native size is 64x64)
    api_url = serve_api(farm_env.settings)
    # When a job that names no size is submitted, Then it records the model's size, not 512
    with FarmClient(api_url) as client:
        submitted = client.submit(prompts=["a fox"])
        job = client.job(submitted["job_ids"][0])
    assert (job["spec"]["width"], job["spec"]["height"]) == (64, 64)
