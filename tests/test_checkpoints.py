"""Single-file checkpoints (the A1111/ComfyUI format) load offline and render like their folder.

The tiny model is written as one `.safetensors` file in the original LDM key layout, with its
configs beside it, and must render the same pixels as its diffusers folder; the configs shipped
for real SD 1.x/2.x checkpoints must build exactly the real architectures (checked by parameter
count, on the meta device, without any weights); a checkpoint that cannot load fails the worker's
start with a message that says what to do.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from shared.errors import ModelLoadError
from tests.fixtures_farm import ROOT
from worker.checkpoints import SHIPPED_CONFIGS
from worker.ldm_keys import write_single_file
from worker.models import load_model
from worker.sampler import PassParams, Row, render_pass

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROWS = [Row("a red fox in the snow", "blurry", 5, 7.5), Row("a castle", "", 6, 4.0)]
PARAMS = PassParams(6, 64, 64, "dpmpp_2m_karras")


@pytest.fixture(scope="module")
def single_file(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_single_file(tiny_model_dir, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def test_a_single_file_checkpoint_renders_the_pixels_of_its_diffusers_folder(
    tiny_model_dir: Path,
    single_file: Path,
) -> None:
    # Given the tiny model as a folder and as one file in the LDM layout (A1111's)
    folder = load_model("tiny", str(tiny_model_dir))
    checkpoint = load_model("tiny-file", str(single_file))
    # When both render the same rows
    theirs = render_pass(folder, ROWS, PARAMS).images
    ours = render_pass(checkpoint, ROWS, PARAMS).images
    # Then the pixels agree
    for a, b in zip(ours, theirs, strict=True):
        assert a is not None and b is not None
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2
    # And the model hash is A1111's: the first 10 hex digits of the file's SHA-256
    expected = hashlib.sha256(single_file.read_bytes()).hexdigest()[:10]
    assert checkpoint.model_hash == expected
    assert checkpoint.prediction_type == "epsilon"


def test_a_checkpoint_without_tokenizer_files_names_them_and_where_they_go(
    single_file: Path, tmp_path: Path
) -> None:
    # Given a checkpoint whose configuration has no CLIP vocabulary
    bare = tmp_path / "bare.safetensors"
    shutil.copy(single_file, bare)
    shutil.copytree(single_file.with_suffix(".config"), bare.with_suffix(".config"))
    for name in ("vocab.json", "merges.txt"):
        (bare.with_suffix(".config") / "tokenizer" / name).unlink()
    # When it is loaded, Then the error names the files and the folder to put them in
    with pytest.raises(ModelLoadError) as caught:
        load_model("bare", str(bare))
    message = str(caught.value)
    assert "vocab.json and merges.txt" in message and str(tmp_path / "tokenizer") in message
    # And once they are beside the checkpoint, it loads
    shutil.copytree(single_file.with_suffix(".config") / "tokenizer", tmp_path / "tokenizer")
    assert load_model("bare", str(bare)).model_hash


def test_a_worker_whose_checkpoint_cannot_load_fails_its_start_with_the_reason(
    tmp_path: Path,
) -> None:
    # Given a .safetensors file that holds no Stable Diffusion model
    stray = tmp_path / "stray.safetensors"
    save_file({"some.weight": torch.zeros(2, 2)}, stray)
    # When a worker is started with it
    env = {**os.environ, "SDFARM_REDIS_URL": "redis://127.0.0.1:1/0"}  # never reached
    result = subprocess.run(
        [sys.executable, "-m", "producer", "worker", "--model", f"stray={stray}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
        check=False,
    )
    # Then it exits before taking work, saying which model and why
    assert result.returncode != 0
    assert "model 'stray'" in result.stderr and "holds no SD 1.x" in result.stderr


# Parameter counts of the released models' components (diffusers' layout).
REAL_SIZES = {
    "sd1": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd2-v": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sd2-base": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
}


@pytest.mark.parametrize("name", list(REAL_SIZES))
def test_the_shipped_configs_build_the_real_sd_architectures(name: str) -> None:
    config = SHIPPED_CONFIGS / name
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(config / "text_encoder"))
    sizes = {
        part: sum(p.numel() for p in module.parameters())
        for part, module in (("unet", unet), ("vae", vae), ("text_encoder", text))
    }
    assert sizes == REAL_SIZES[name]
