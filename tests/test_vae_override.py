"""A job's VAE override decodes (and for img2img encodes) as diffusers does when given that VAE.

The reference is `StableDiffusionPipeline.from_pretrained(tiny, vae=<the override>)` (and the
img2img pipeline likewise), compared as 8-bit pixels within ±2 levels; the override is a second
tiny VAE with weights of another seed, so it visibly differs from the model's own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from diffusers import AutoencoderKL, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import save_file

from producer.submit import validate_jobs
from shared.config import Settings
from shared.errors import InvalidJob
from shared.ids import new_batch_id
from shared.jobs import JobSpec
from shared.ledger import Ledger
from shared.metadata import read_png_metadata
from shared.storage import FileStorage
from tests.test_img2img import init_picture, png_base64
from worker.chunk import process_chunk
from worker.context import WorkerContext
from worker.ldm_keys import _vae_state
from worker.models import LoadedModel, load_model
from worker.rows import pass_params, row_for
from worker.sampler import PassParams, Row, render_pass
from worker.tiny import make_tiny_vae
from worker.vaes import LoadedVae, load_vae, swap_vae, with_vae

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PIXEL_TOLERANCE = 2  # levels of 255, per channel
PARAMS = PassParams(steps=6, width=64, height=64)
ROW = Row("a photo of a cat, highly detailed", "blurry", 1234, 7.5)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_vae(tmp_path_factory.mktemp("vaes") / "other-vae", seed=7)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> LoadedModel:
    return load_model("tiny", str(tiny_model_dir))


@pytest.fixture(scope="module")
def override(vae_dir: Path) -> LoadedVae:
    return load_vae("other", str(vae_dir))


def difference(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def report(capsys: pytest.CaptureFixture[str], what: str, value: int) -> None:
    with capsys.disabled():
        print(f"\n  max pixel difference, {what}: {value} (tolerance {PIXEL_TOLERANCE})")


def test_a_vae_override_renders_the_pixels_of_the_pipeline_given_that_vae(
    model: LoadedModel,
    override: LoadedVae,
    tiny_model_dir: Path,
    vae_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given the tiny model with another VAE in its place, and diffusers' pipeline given that VAE
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_model_dir, vae=AutoencoderKL.from_pretrained(vae_dir), safety_checker=None
    )
    pipe.set_progress_bar_config(disable=True)
    # When both render the same row
    ours = render_pass(with_vae(model, override), [ROW], PARAMS).images[0]
    own = render_pass(model, [ROW], PARAMS).images[0]
    theirs = pipe(
        prompt=ROW.prompt,
        negative_prompt=ROW.negative_prompt,
        num_inference_steps=PARAMS.steps,
        guidance_scale=ROW.guidance,
        height=64,
        width=64,
        generator=[torch.Generator().manual_seed(ROW.seed)],
        output_type="np",
    ).images[0]
    theirs = (theirs * 255).round().astype(np.uint8)
    # Then they agree within the tolerance, and the override is not the model's own VAE
    assert ours is not None and own is not None
    value = difference(ours, theirs)
    report(capsys, "VAE override vs pipeline(vae=...)", value)
    assert value <= PIXEL_TOLERANCE
    assert difference(ours, own) > 10 * PIXEL_TOLERANCE


def test_img2img_encodes_with_the_override_as_the_img2img_pipeline_given_it(
    model: LoadedModel,
    override: LoadedVae,
    tiny_model_dir: Path,
    vae_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given an img2img job naming the VAE, and diffusers' img2img pipeline given that VAE
    spec = JobSpec(
        prompt=ROW.prompt,
        negative_prompt=ROW.negative_prompt,
        steps=PARAMS.steps,
        width=64,
        height=64,
        seed=ROW.seed,
        init_image=png_base64(init_picture()),
        strength=0.6,
        vae="other",
    )
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        tiny_model_dir, vae=AutoencoderKL.from_pretrained(vae_dir), safety_checker=None
    )
    pipe.set_progress_bar_config(disable=True)
    # When both render it
    swapped, _, problem = swap_vae({"other": override}, spec.vae, model, None)
    assert problem is None
    ours = render_pass(swapped, [row_for(spec)], pass_params(spec)).images[0]
    theirs = pipe(
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt,
        image=init_picture(),
        strength=0.6,
        num_inference_steps=PARAMS.steps,
        guidance_scale=spec.guidance,
        generator=[torch.Generator().manual_seed(ROW.seed)],
        output_type="np",
    ).images[0]
    # Then the images agree within the tolerance
    assert ours is not None
    value = difference(ours, (theirs * 255).round().astype(np.uint8))
    report(capsys, "img2img with a VAE override", value)
    assert value <= PIXEL_TOLERANCE


def test_a_single_file_vae_in_ldm_layout_decodes_as_its_folder(
    model: LoadedModel, override: LoadedVae, vae_dir: Path, tmp_path: Path
) -> None:
    # Given the override VAE as A1111 keeps one: a single .safetensors file in LDM's layout (keys
    # without `first_stage_model.`), its tiny architecture's config.json beside it
    state = _vae_state(AutoencoderKL.from_pretrained(vae_dir))
    state = {k.removeprefix("first_stage_model."): v.contiguous() for k, v in state.items()}
    path = tmp_path / "other.safetensors"
    save_file(state, path)
    (tmp_path / "other.config").mkdir()
    (tmp_path / "other.config" / "config.json").write_text((vae_dir / "config.json").read_text())
    # When it is loaded and renders the row
    single = load_vae("other-file", str(path))
    ours = render_pass(with_vae(model, single), [ROW], PARAMS).images[0]
    folder = render_pass(with_vae(model, override), [ROW], PARAMS).images[0]
    # Then it decodes what the folder decodes, with the model's scaling factor, and has a hash
    assert single.scaling_factor is None and len(single.vae_hash) == 10
    assert ours is not None and folder is not None
    assert difference(ours, folder) == 0


def test_a_chunk_naming_a_vae_decodes_with_it_and_its_png_names_it(
    model: LoadedModel, override: LoadedVae, redis_url: str, tmp_path: Path
) -> None:
    # Given a worker holding the model and the VAE, and one job naming it, one not
    client = redis.Redis.from_url(redis_url)
    ledger = Ledger(client, status_ttl_s=3600, lease_s=30)
    settings = Settings(redis_url=redis_url, models={"tiny": model.path}, vaes={"other": "x"})
    storage = FileStorage(tmp_path)
    ctx = WorkerContext(
        settings=settings,
        ledger=ledger,
        storage=storage,
        models={"tiny": model},
        worker_id="w-vae",
        vaes={"other": override},
    )
    base = {"model": "tiny", "prompt": ROW.prompt, "width": 64, "height": 64, "steps": 3}
    plain, named = (
        JobSpec.model_validate({**base, "seed": 5, **extra}) for extra in ({}, {"vae": "other"})
    )
    # When each is processed as its own chunk
    ids = [ledger.create_batch(new_batch_id(), [spec])[0] for spec in (plain, named)]
    for job_id in ids:
        assert process_chunk(ctx, [job_id], "tiny").succeeded == [job_id]
    # Then the PNG of the job naming the VAE says so, as A1111 writes it, and the other does not
    texts = [
        read_png_metadata(storage.get(ledger.job(job_id)["result"]["key"]))["parameters"]
        for job_id in ids
    ]
    assert "VAE" not in texts[0]
    assert f"VAE hash: {override.vae_hash}, VAE: other" in texts[1]
    client.close()


def test_a_worker_without_the_vae_fails_the_job_saying_to_configure_it(
    model: LoadedModel,
) -> None:
    # Given a worker that loaded no VAE
    # When a chunk naming one is put together
    _, _, problem = swap_vae({}, "other", model, None)
    # Then it cannot be rendered, and the reason says what to do
    assert problem is not None and "SDFARM_VAES" in problem and "'other'" in problem


def test_an_unknown_vae_is_refused_at_submit_listing_the_configured_ones() -> None:
    # Given a farm with one VAE
    settings = Settings(models={"tiny": "/m"}, vaes={"mse": "/v/mse", "ema": "/v/ema"})
    # When a job names another
    with pytest.raises(InvalidJob) as refused:
        validate_jobs([{"prompt": "a cat", "vae": "kl-f8"}], settings)
    # Then the refusal names the field and the configured VAEs
    problem = refused.value.details[0]
    assert problem["field"] == "vae" and problem["job"] == 0
    assert "mse, ema" in problem["message"]
    assert validate_jobs([{"prompt": "a cat", "vae": "mse"}], settings)[0].vae == "mse"


def test_sdfarm_vaes_is_read_like_sdfarm_models() -> None:
    # Given SDFARM_VAES as an operator writes it
    settings = Settings.model_validate({"vaes": "mse=/v/mse.safetensors, ema=/v/ema"})
    # Then it is a mapping of names to paths; a malformed entry is refused
    assert settings.vaes == {"mse": "/v/mse.safetensors", "ema": "/v/ema"}
    with pytest.raises(ValueError, match="NAME=PATH"):
        Settings.model_validate({"vaes": "no-equals-sign"})


def test_sdfarm_render_takes_a_vae_and_its_png_names_it(
    model: LoadedModel, override: LoadedVae, tiny_model_dir: Path, vae_dir: Path, tmp_path: Path
) -> None:
    # Given `sdfarm render` with --vae
    from worker.render_command import render, render_parser

    out = tmp_path / "out.png"
    options = ["--model", str(tiny_model_dir), "--prompt", ROW.prompt, "--seed", str(ROW.seed)]
    options += ["--negative-prompt", ROW.negative_prompt, "--steps", str(PARAMS.steps)]
    options += ["--width", "64", "--height", "64", "--vae", str(vae_dir), "--out", str(out)]
    # When it renders
    assert render(render_parser().parse_args(options)) == 0
    # Then the image is the override's, and its parameters name the VAE by its folder's name
    expected = render_pass(with_vae(model, override), [ROW], PARAMS).images[0]
    assert expected is not None
    assert difference(np.asarray(Image.open(out).convert("RGB")), expected) <= PIXEL_TOLERANCE
    parameters = read_png_metadata(out.read_bytes())["parameters"]
    assert f"VAE hash: {override.vae_hash}, VAE: other-vae" in parameters
