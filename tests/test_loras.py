"""LoRAs: the worker applies a LoRA of either layout as diffusers' `load_lora_weights` +
`set_adapters` does (SD 1.x and SDXL, weights 0.5 and 1.0, within PIXEL_TOLERANCE), keeps loaded
ones within a byte budget, switches them off for jobs without; the library tells each file's
family from its header, and the API refuses unknown LoRAs and LoRAs for another family."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

from producer.submit import validate_jobs
from shared.config import Settings
from shared.errors import InvalidJob
from shared.lora_library import LoraLibrary, lora_short_hash
from shared.routing import compat_key
from tests.test_samplers import PIXEL_TOLERANCE, ROW, STEPS, difference, diffusers_image
from worker.loras import LoraCache
from worker.models import LoadedModel, load_model
from worker.rows import pass_params
from worker.sampler import PassParams, render_pass
from worker.tiny_lora import make_tiny_lora

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VISIBLE = 10  # levels: a LoRA at 0.5 changes the tiny models' images by more than this
ARCHS = {"sd1": "lms", "sdxl": "euler"}  # each arch's sampler in these tests


@pytest.fixture(scope="module")
def lora_dir(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_sdxl_dir: Path
) -> Path:
    """Tiny LoRAs of both layouts for both tiny models: `{arch}-{layout}`, and `sd1-b`."""
    root = tmp_path_factory.mktemp("loras")
    for arch, model_dir in (("sd1", tiny_model_dir), ("sdxl", tiny_sdxl_dir)):
        for layout in ("diffusers", "kohya"):
            make_tiny_lora(model_dir, root / f"{arch}-{layout}.safetensors", layout=layout)
    make_tiny_lora(tiny_model_dir, root / "sd1-b.safetensors", layout="kohya", seed=7)
    return root


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path, tiny_sdxl_dir: Path) -> dict[str, LoadedModel]:
    """Models of this module's own: LoRAs loaded here stay out of other modules' models."""
    return {
        "sd1": load_model("tiny", str(tiny_model_dir)),
        "sdxl": load_model("xl", str(tiny_sdxl_dir)),
    }


@pytest.fixture(scope="module")
def cache(lora_dir: Path) -> LoraCache:
    """The module's models' LoRA cache (a model's adapters belong to one cache)."""
    return LoraCache(LoraLibrary(lora_dir), max_bytes=10**9)


def params(arch: str) -> PassParams:
    return PassParams(steps=STEPS, width=64, height=64, scheduler=ARCHS[arch])


def diffusers_with_loras(model_dir: Path, arch: str, loras: list[tuple[Path, float]]) -> np.ndarray:
    """The reference: a fresh diffusers pipeline, `load_lora_weights` + `set_adapters`."""
    if arch == "sdxl":
        pipe: StableDiffusionPipeline | StableDiffusionXLPipeline = (
            StableDiffusionXLPipeline.from_pretrained(model_dir)
        )
    else:
        pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Already found a `peft_config`", UserWarning)
        for index, (path, _) in enumerate(loras):
            pipe.load_lora_weights(str(path), adapter_name=f"l{index}")
    pipe.set_adapters([f"l{i}" for i in range(len(loras))], [w for _, w in loras])
    return diffusers_image(pipe, ARCHS[arch], ROW)


CASES = [
    (arch, layout, weight)
    for arch in ARCHS
    for layout in ("diffusers", "kohya")
    for weight in (0.5, 1.0)
]


@pytest.mark.parametrize(("arch", "layout", "weight"), CASES)
def test_a_lora_renders_the_pixels_diffusers_renders_with_it(
    arch: str, layout: str, weight: float, models: dict[str, LoadedModel], cache: LoraCache
) -> None:
    # Given a tiny model and its image without LoRAs
    model = models[arch]
    cache.activate(model, ())
    plain = render_pass(model, [ROW], params(arch)).images[0]
    # When the LoRA is activated at the weight and the row rendered
    name = f"{arch}-{layout}"
    cache.activate(model, ((name, weight),))
    image = render_pass(model, [ROW], params(arch)).images[0]
    # Then it is diffusers' image with the same LoRA at the same weight, and visibly changed
    path = cache.library.get(name).path  # type: ignore[union-attr]
    reference = diffusers_with_loras(Path(model.path), arch, [(path, weight)])
    assert difference(image, reference) <= PIXEL_TOLERANCE
    assert difference(image, plain) > VISIBLE
    cache.activate(model, ())


def test_two_loras_at_once_render_as_diffusers_with_both(
    models: dict[str, LoadedModel], cache: LoraCache, lora_dir: Path
) -> None:
    # Given the SD 1.x model and two kohya LoRAs
    model = models["sd1"]
    # When both are active at different weights (in the order the compat key sorts them)
    cache.activate(model, (("sd1-b", 1.0), ("sd1-kohya", 0.5)))
    image = render_pass(model, [ROW], params("sd1")).images[0]
    cache.activate(model, ())
    # Then the image is diffusers' with both adapters set at those weights
    reference = diffusers_with_loras(
        Path(model.path),
        "sd1",
        [(lora_dir / "sd1-b.safetensors", 1.0), (lora_dir / "sd1-kohya.safetensors", 0.5)],
    )
    assert difference(image, reference) <= PIXEL_TOLERANCE


def test_a_job_without_loras_after_one_with_renders_as_before(
    models: dict[str, LoadedModel], lora_dir: Path
) -> None:
    # Given an image rendered before any LoRA was loaded into a fresh model
    model = load_model("tiny-fresh", models["sd1"].path)
    before = render_pass(model, [ROW], params("sd1")).images[0]
    cache = LoraCache(LoraLibrary(lora_dir), max_bytes=10**9)
    # When a pass with a LoRA runs, then one without
    cache.activate(model, (("sd1-kohya", 1.0),))
    render_pass(model, [ROW], params("sd1"))
    cache.activate(model, ())
    after = render_pass(model, [ROW], params("sd1")).images[0]
    # Then the second image is the first, pixel for pixel, and the LoRA stays loaded
    assert difference(after, before) == 0
    assert cache.loaded(model) == ["sd1-kohya"]


def test_loaded_loras_stay_within_the_byte_budget_least_recently_used_out_first(
    lora_dir: Path, tiny_model_dir: Path
) -> None:
    # Given a cache with room for one of two LoRAs of about the same size
    model = load_model("tiny-lru", str(tiny_model_dir))
    library = LoraLibrary(lora_dir)
    size = max(library.get(n).size_bytes for n in ("sd1-kohya", "sd1-b"))  # type: ignore[union-attr]
    cache = LoraCache(library, max_bytes=size + size // 2)
    # When a pass uses the first twice, then the second, then the first again
    for name in ("sd1-kohya", "sd1-kohya", "sd1-b", "sd1-kohya"):
        cache.activate(model, ((name, 1.0),))
    # Then each switch loaded the LoRA and unloaded the other from the U-Net and text encoder
    assert cache.counts() == {"lora_loads": 3, "lora_hits": 1, "lora_evictions": 2}
    assert cache.loaded(model) == ["sd1-kohya"]
    assert len(model.unet.peft_config) == 1
    assert len(model.text_encoder.peft_config) == 1  # type: ignore[union-attr]


def test_a_pass_keeps_its_whole_set_loaded_even_above_the_budget(
    lora_dir: Path, tiny_model_dir: Path
) -> None:
    # Given a cache whose budget is smaller than one LoRA
    model = load_model("tiny-small", str(tiny_model_dir))
    cache = LoraCache(LoraLibrary(lora_dir), max_bytes=1)
    # When a pass needs two LoRAs
    hashes = cache.activate(model, (("sd1-b", 1.0), ("sd1-kohya", 1.0)))
    # Then both are loaded for it, and the hashes name both
    assert sorted(cache.loaded(model)) == ["sd1-b", "sd1-kohya"]
    assert sorted(hashes) == ["sd1-b", "sd1-kohya"]


def test_a_lora_that_is_not_a_lora_for_the_model_is_a_clear_invalid_input(
    models: dict[str, LoadedModel], cache: LoraCache
) -> None:
    # Given an SDXL LoRA and the SD 1.x model
    # When the cache is asked to load it into the SD 1.x model
    with pytest.raises(InvalidJob, match=r"LoRA 'sdxl-kohya' cannot be loaded into model 'tiny'"):
        cache.activate(models["sd1"], (("sdxl-kohya", 1.0),))
    # Then nothing of it stays behind, and the model still renders without LoRAs
    assert "sdxl-kohya" not in cache.loaded(models["sd1"])
    cache.activate(models["sd1"], ())
    assert render_pass(models["sd1"], [ROW], params("sd1")).images[0] is not None


def _header_only_lora(path: Path, key: str, width: int) -> Path:
    save_file({key: torch.zeros(1, width, dtype=torch.float16)}, str(path))
    return path


@pytest.mark.parametrize(
    ("key", "width", "family"),
    [
        (
            "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight",
            768,
            "sd1",
        ),
        ("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight", 1024, "sd2"),
        (
            "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight",
            2048,
            "sdxl",
        ),
        ("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", 1024, "sd2"),
        ("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", 1280, "sdxl"),
    ],
)
def test_the_library_tells_a_loras_family_from_its_header(
    tmp_path: Path, key: str, width: int, family: str
) -> None:
    # Given a LoRA file with one tensor of a real model's width
    _header_only_lora(tmp_path / "x.safetensors", key, width)
    # When the library lists the folder
    found = LoraLibrary(tmp_path).get("x")
    # Then its family is the one that width belongs to
    assert found is not None and found.family == family


def test_the_tiny_loras_families_and_a1111_short_hash(lora_dir: Path) -> None:
    # Given the library of tiny LoRAs
    library = LoraLibrary(lora_dir)
    # Then kohya's metadata and SDXL's second text encoder tell the families; PEFT SD 1.x does not
    assert {n: f.family for n, f in library.snapshot().items()} == {
        "sd1-b": "sd1",
        "sd1-diffusers": None,
        "sd1-kohya": "sd1",
        "sdxl-diffusers": "sdxl",
        "sdxl-kohya": "sdxl",
    }
    # And the short hash is A1111's "addnet" hash: SHA-256 of what follows the header, 12 digits
    data = (lora_dir / "sd1-kohya.safetensors").read_bytes()
    tensors = data[8 + int.from_bytes(data[:8], "little") :]
    assert (
        lora_short_hash(lora_dir / "sd1-kohya.safetensors")
        == hashlib.sha256(tensors).hexdigest()[:12]
    )


def test_a_lora_copied_into_the_library_later_is_found_without_a_restart(
    tmp_path: Path, lora_dir: Path
) -> None:
    # Given a library that has been listed while empty
    library = LoraLibrary(tmp_path)
    assert library.names() == []
    # When a LoRA is copied in
    (tmp_path / "late.safetensors").write_bytes((lora_dir / "sd1-kohya.safetensors").read_bytes())
    # Then the next lookup finds it
    assert library.get("late") is not None and library.names() == ["late"]


def _settings(tiny_model_dir: Path, tiny_sdxl_dir: Path, lora_dir: Path) -> Settings:
    models = {"tiny": str(tiny_model_dir), "xl": str(tiny_sdxl_dir)}
    return Settings(models=models, lora_dir=lora_dir)


FAMILIES = {"tiny": "sd1", "xl": "sdxl"}


def test_a_tag_and_the_field_give_the_same_job_and_the_same_pass(
    tiny_model_dir: Path, tiny_sdxl_dir: Path, lora_dir: Path
) -> None:
    # Given the farm's settings and its library
    settings = _settings(tiny_model_dir, tiny_sdxl_dir, lora_dir)
    library = LoraLibrary(lora_dir)
    # When one job names its LoRA with a tag and another with the field
    tagged, fielded = validate_jobs(
        [
            {"prompt": "a fox <lora:sd1-kohya:0.5>", "seed": 1},
            {"prompt": "a fox", "loras": [{"name": "sd1-kohya", "weight": 0.5}], "seed": 1},
        ],
        settings,
        families=FAMILIES,
        loras=library,
    )
    # Then both are the same job, in the same compatibility group, with the same pass LoRAs
    assert tagged == fielded
    assert compat_key(tagged) == compat_key(fielded)
    assert pass_params(tagged).loras == (("sd1-kohya", 0.5),)


def test_an_unknown_lora_is_refused_at_submit_with_the_names_that_exist(
    tiny_model_dir: Path, tiny_sdxl_dir: Path, lora_dir: Path
) -> None:
    settings = _settings(tiny_model_dir, tiny_sdxl_dir, lora_dir)
    # When a job names a LoRA the library lacks
    with pytest.raises(InvalidJob) as refused:
        validate_jobs(
            [{"prompt": "a fox <lora:nope:1>"}],
            settings,
            families=FAMILIES,
            loras=LoraLibrary(lora_dir),
        )
    # Then the refusal names the field, the LoRA and what the library holds
    assert refused.value.details[0]["field"] == "loras.0.name"
    assert "unknown LoRA 'nope'; the library holds: sd1-b, sd1-diffusers" in str(refused.value)


def test_a_lora_for_another_family_is_refused_at_submit(
    tiny_model_dir: Path, tiny_sdxl_dir: Path, lora_dir: Path
) -> None:
    settings = _settings(tiny_model_dir, tiny_sdxl_dir, lora_dir)
    # When an SD 1.x job names an SDXL LoRA
    with pytest.raises(InvalidJob, match=r"LoRA 'sdxl-kohya' is for sdxl models; 'tiny' is sd1"):
        validate_jobs(
            [{"prompt": "a fox", "model": "tiny", "loras": [{"name": "sdxl-kohya"}]}],
            settings,
            families=FAMILIES,
            loras=LoraLibrary(lora_dir),
        )


def test_loras_are_refused_on_a_farm_without_a_library(tiny_model_dir: Path) -> None:
    settings = Settings(models={"tiny": str(tiny_model_dir)})
    with pytest.raises(InvalidJob, match="this farm has no LoRA library: set SDFARM_LORA_DIR"):
        validate_jobs([{"prompt": "a fox <lora:a:1>"}], settings)
