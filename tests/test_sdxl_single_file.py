"""Single-file SDXL checkpoints (SGM's layout, A1111's and ComfyUI's) load offline as SDXL.

The tiny SDXL written as one `.safetensors` file must render exactly the pixels of its folder; a
file that diffusers' own `from_single_file` reads must render as sdfarm renders it, which shows
the layout is SDXL's real one and not only the inverse of our own reader; the refiner's file
must give its folder's weights; the API must tell a file's family and size from its header alone,
without torch; and a file with a text encoder missing must say which.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from shared.checkpoint_keys import SDXL_TEXT_2
from shared.errors import ModelLoadError
from shared.families import read_model_facts
from tests.fixtures_farm import ROOT
from tests.test_checkpoints import PARAMS, ROWS
from tests.test_samplers import ROW, difference
from worker import tiny_sdxl
from worker.checkpoints import SHIPPED_CONFIGS
from worker.ldm_keys import write_single_file
from worker.models import load_model
from worker.sampler import PassParams, render_pass
from worker.tiny import make_tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sdxl_file(tiny_sdxl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "tiny-sdxl.safetensors"
    return write_single_file(tiny_sdxl_dir, out)


@pytest.fixture(scope="module")
def wide_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SDXL with its second text encoder wider than its first, as SDXL's are (768 and
    1280): diffusers' single-file loader tells the two apart by width alone."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tiny_sdxl, "TEXT_HIDDEN", (32, 64))
        return make_tiny(tmp_path_factory.mktemp("models") / "tiny-sdxl-wide", arch="sdxl")


def test_an_sdxl_single_file_renders_exactly_the_pixels_of_its_folder(
    tiny_sdxl_dir: Path, sdxl_file: Path
) -> None:
    # Given the tiny SDXL as a folder and as one file in SGM's layout (A1111's)
    folder = load_model("tiny-sdxl", str(tiny_sdxl_dir))
    checkpoint = load_model("tiny-sdxl-file", str(sdxl_file))
    # When both render the same rows (one with an empty negative prompt)
    theirs = render_pass(folder, ROWS, PARAMS).images
    ours = render_pass(checkpoint, ROWS, PARAMS).images
    # Then the pixels are the same, and the file is read as SDXL with SDXL's flags
    for a, b in zip(ours, theirs, strict=True):
        assert a is not None and b is not None and a.std() > 5
        assert np.array_equal(a, b)
    assert checkpoint.family == "sdxl" and checkpoint.text_encoder_2 is not None
    assert checkpoint.force_zeros_for_empty_prompt
    assert checkpoint.scaling_factor == pytest.approx(0.13025)


def test_diffusers_own_single_file_loader_renders_the_file_as_sdfarm_does(
    wide_sdxl_dir: Path, tmp_path: Path
) -> None:
    # Given the tiny SDXL (its encoders of two widths) written as one file
    single_file = write_single_file(wide_sdxl_dir, tmp_path / "wide.safetensors")
    # When diffusers' StableDiffusionXLPipeline reads it, given only the folder's configs
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(single_file), config=str(wide_sdxl_dir), local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        prompt=ROW.prompt,
        negative_prompt=ROW.negative_prompt,
        num_inference_steps=6,
        guidance_scale=ROW.guidance,
        height=64,
        width=64,
        generator=[torch.Generator().manual_seed(ROW.seed)],
        output_type="np",
    ).images[0]
    theirs = (image * 255).round().astype(np.uint8)
    # And sdfarm renders the same row from the file with the model's own sampler (Euler)
    ours = render_pass(load_model("wide", str(single_file)), [ROW], PassParams(6, 64, 64, "euler"))
    # Then the pixels agree within 1 level
    assert difference(ours.images[0], theirs) <= 1


def test_an_sdxl_refiner_single_file_holds_the_weights_of_its_folder(
    tiny_refiner_dir: Path, tmp_path: Path
) -> None:
    # Given the tiny SDXL refiner written as one file (its only encoder SGM's embedder 0)
    single_file = write_single_file(tiny_refiner_dir, tmp_path / "refiner.safetensors")
    # When the folder and the file are loaded
    folder = load_model("refiner", str(tiny_refiner_dir))
    checkpoint = load_model("refiner-file", str(single_file))
    # Then every weight is the folder's, and the file is read as the refiner with its flags
    assert checkpoint.text_encoder is None and folder.text_encoder_2 is not None
    for part in ("unet", "vae", "text_encoder_2"):
        want, got = getattr(folder, part).state_dict(), getattr(checkpoint, part).state_dict()
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), part
    assert checkpoint.family == "sdxl-refiner"
    assert checkpoint.requires_aesthetics_score and not checkpoint.force_zeros_for_empty_prompt


def _header_only(path: Path, keys: list[str]) -> Path:
    """A `.safetensors` file whose tensors are named as a real checkpoint's (one each, tiny)."""
    save_file({key: torch.zeros(1) for key in keys}, path)
    return path


def test_a_single_files_family_and_size_are_read_from_its_header_without_torch(
    sdxl_file: Path, tmp_path: Path
) -> None:
    # Given the tiny SDXL file (its configs beside it) and a copy of it without them
    bare = tmp_path / "bare-sdxl.safetensors"
    bare.write_bytes(sdxl_file.read_bytes())
    # When an interpreter that cannot import torch reads their facts
    script = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
        "from shared.families import read_model_facts\n"
        f"for path in {[str(sdxl_file), str(bare)]!r}:\n"
        "    facts = read_model_facts(path)\n"
        "    print(facts.family, facts.native_px)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    # Then the file with configs has its folder's size, and the bare one SDXL 1.0's
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["sdxl 64", "sdxl 1024"]


@pytest.mark.parametrize(
    ("text_keys", "yaml", "expected"),
    [
        (["cond_stage_model.transformer.text_model.final_layer_norm.weight"], None, ("sd1", 512)),
        (["cond_stage_model.model.ln_final.weight"], None, ("sd2", 768)),
        (["cond_stage_model.model.ln_final.weight"], 'parameterization: "v"\n', ("sd2", 768)),
        (["cond_stage_model.model.ln_final.weight"], "linear_start: 0.00085\n", ("sd2", 512)),
        (["conditioner.embedders.0.model.ln_final.weight"], None, ("sdxl-refiner", 1024)),
        (["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"], None, None),
    ],
)
def test_each_familys_single_file_is_told_by_its_text_encoder_keys(
    tmp_path: Path, text_keys: list[str], yaml: str | None, expected: tuple[str, int] | None
) -> None:
    # Given a file with a U-Net and the text encoder keys of one family (an A1111 yaml beside)
    path = _header_only(
        tmp_path / "model.safetensors", ["model.diffusion_model.out.2.bias", *text_keys]
    )
    if yaml is not None:
        path.with_suffix(".yaml").write_text(yaml)
    # When its facts are read, Then they are the family's (none for half of SDXL's pair)
    facts = read_model_facts(str(path))
    assert ((facts.family, facts.native_px) if facts is not None else None) == expected


def test_a_pickled_checkpoint_has_no_facts_here(tmp_path: Path) -> None:
    # Given a `.ckpt`, a pickle, which only loading it (running it) could read
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04not opened")
    # When its facts are asked for, Then there are none, rather than a guess
    assert read_model_facts(str(ckpt)) is None


def test_an_sdxl_file_without_its_second_text_encoder_says_what_is_missing(
    sdxl_file: Path, tmp_path: Path
) -> None:
    # Given the tiny SDXL file less its OpenCLIP ViT-bigG (SGM's embedder 1)
    state = load_file(sdxl_file)
    broken = tmp_path / "half.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith(SDXL_TEXT_2)}, broken)
    # When it is loaded, Then the error names the missing embedder, and what SDXL holds
    with pytest.raises(ModelLoadError) as caught:
        load_model("half", str(broken))
    message = str(caught.value)
    assert "model 'half'" in message and f"lacks `{SDXL_TEXT_2}*`" in message
    assert "CLIP ViT-L" in message and "OpenCLIP ViT-bigG" in message


# Parameter counts of SDXL 1.0 base's components (diffusers' layout).
SDXL_SIZES = {
    "unet": 2_567_463_684,
    "vae": 83_653_863,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
}


def test_the_shipped_sdxl_configs_build_the_real_sdxl_architecture() -> None:
    config = SHIPPED_CONFIGS / "sdxl"
    with torch.device("meta"):
        modules = {
            "unet": UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(config / "unet")
            ),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(config / "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(config / "text_encoder")),
            "text_encoder_2": CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(config / "text_encoder_2")
            ),
        }
    sizes = {part: sum(p.numel() for p in module.parameters()) for part, module in modules.items()}
    assert sizes == SDXL_SIZES
    # And the model's flags and the second tokenizer's padding are SDXL 1.0's
    assert json.loads((config / "model_index.json").read_text())["force_zeros_for_empty_prompt"]
    second = json.loads((config / "tokenizer_2" / "tokenizer_config.json").read_text())
    assert second["pad_token"] == "!"
