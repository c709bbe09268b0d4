"""Textual-inversion embeddings render what diffusers' `load_textual_inversion` renders.

A folder holds a random embedding in each format (A1111's `.pt`, civitai's `emb_params`
`.safetensors`, diffusers' `learned_embeds.bin`, a 3-vector `.pt`, and one of another width) for
the tiny SD 1.x, plus an SDXL `clip_l`/`clip_g` file for the tiny SDXL. Each is installed with
worker/embeddings.py; a prompt naming it is rendered with `render_pass` and compared with
diffusers' pipeline on the same model folder after `load_textual_inversion(file, token=name)`,
within ±2 levels per channel. A prompt naming none renders bit for bit as on a model without them.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from pydantic import ValidationError

from shared.config import Settings
from shared.jobs import JobSpec
from shared.metadata import encode_png, read_png_metadata
from tests.test_samplers import (
    PIXEL_TOLERANCE,
    ROW,
    difference,
    diffusers_image,
    together_and_alone,
)
from tests.test_sdxl import sdxl_image
from worker.cli import main as worker_cli
from worker.embeddings import install_embeddings, read_embeddings, ti_hashes_param, used_embeddings
from worker.models import LoadedModel, load_model
from worker.sampler import PassParams, render_pass

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WIDTH = 32  # the tiny text encoders' hidden size (768 in SD 1.x)
PARAMS = PassParams(8, 64, 64, "euler")


class NotATensor:
    """Something a weights-only unpickler refuses to build."""


def vectors(seed: int, count: int, width: int = WIDTH) -> torch.Tensor:
    # Unit-variance vectors, far from the encoder's own token rows: they change the image.
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed))


def a1111(vec: torch.Tensor, name: str) -> dict[str, object]:
    """What A1111's `Embedding.save` writes."""
    return {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": vec},
        "name": name,
        "step": 0,
        "sd_checkpoint": None,
        "sd_checkpoint_name": None,
    }


@pytest.fixture(scope="module")
def embeddings_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("embeddings")
    torch.save(a1111(vectors(1, 1), "another name"), folder / "lumenstyle.pt")
    safetensors.torch.save_file({"emb_params": vectors(2, 1)}, folder / "civistyle.safetensors")
    (folder / "cattoy").mkdir()
    torch.save({"<cat-toy>": vectors(3, 1)[0]}, folder / "cattoy" / "learned_embeds.bin")
    torch.save(a1111(vectors(4, 3), "tripleneg"), folder / "tripleneg.pt")
    torch.save(a1111(vectors(5, 1, width=48), "widestyle"), folder / "widestyle.pt")
    torch.save(a1111(vectors(6, 1), "evil") | {"x": NotATensor()}, folder / "evil.pt")
    sdxl = {"clip_l": vectors(7, 2), "clip_g": vectors(8, 2)}
    safetensors.torch.save_file(sdxl, folder / "xlstyle.safetensors")
    return folder


@pytest.fixture(scope="module")
def plain(tiny_model_dir: Path) -> LoadedModel:
    return load_model("tiny", str(tiny_model_dir))


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path, embeddings_dir: Path) -> LoadedModel:
    loaded = load_model("tiny", str(tiny_model_dir))
    install_embeddings(loaded, read_embeddings(embeddings_dir))
    return loaded


FILES = {
    "lumenstyle": "lumenstyle.pt",
    "civistyle": "civistyle.safetensors",
    "cattoy": "cattoy/learned_embeds.bin",
    "tripleneg": "tripleneg.pt",
}


@pytest.mark.parametrize("name", list(FILES))
def test_an_embedding_renders_what_diffusers_load_textual_inversion_renders(
    model: LoadedModel, tiny_model_dir: Path, embeddings_dir: Path, name: str
) -> None:
    # Given a prompt naming the embedding in the negative prompt too
    row = replace(ROW, prompt=f"a lighthouse, {name}, sunset", negative_prompt=f"blurry {name}")
    # When sdfarm renders it, and diffusers renders it after load_textual_inversion
    ours = render_pass(model, [row], PARAMS).images[0]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(str(embeddings_dir / FILES[name]), token=name)
    theirs = diffusers_image(pipe, "euler", row)
    # Then the pixels agree, and the embedding changed the image
    without = render_pass(model, [replace(row, prompt="a lighthouse, , sunset")], PARAMS).images[0]
    print(f"{name}: max pixel difference vs diffusers {difference(ours, theirs)}")
    assert difference(ours, theirs) <= PIXEL_TOLERANCE
    assert difference(ours, without) > 10


def test_a_prompt_naming_no_embedding_renders_bit_for_bit_as_before(
    model: LoadedModel, plain: LoadedModel
) -> None:
    # Given a model with embeddings and the same model without, When both render a plain row
    ours = render_pass(model, [ROW], PARAMS).images[0]
    before = render_pass(plain, [ROW], PARAMS).images[0]
    # Then the images are identical
    assert ours is not None and before is not None
    assert np.array_equal(ours, before)


def test_rows_with_and_without_an_embedding_share_a_pass(model: LoadedModel) -> None:
    # Given one row naming a multi-vector embedding and one naming none
    rows = [replace(ROW, negative_prompt="tripleneg, blurry"), ROW]
    # When they render in one pass and alone, Then each renders as it does alone
    together, alone = together_and_alone(model, rows, PARAMS)
    assert max(difference(a, b) for a, b in zip(together, alone, strict=True)) <= PIXEL_TOLERANCE


def test_a_name_is_matched_as_a_word_in_any_case_and_a_multi_vector_one_takes_n_tokens(
    model: LoadedModel, plain: LoadedModel
) -> None:
    # Given prompts holding a name inside longer words, and names in other cases
    def ids(m: LoadedModel, text: str) -> list[int]:
        return list(m.tokenizer(text, add_special_tokens=False).input_ids)

    # Then inside a word it is no embedding, in any case it is, and 3 vectors are 3 tokens
    for text in ("lumenstyles", "xlumenstyle", "lumenstyle_2 tripleneg2"):
        assert ids(model, text) == ids(plain, text)
    assert ids(model, "LumenStyle") == ids(model, "lumenstyle") != ids(plain, "lumenstyle")
    assert len(ids(model, "(tripleneg:1.2)")) == len(ids(plain, "(x:1.2)")) + 2


def test_embeddings_that_do_not_fit_are_skipped_with_a_warning(
    tiny_model_dir: Path, embeddings_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Given the folder, When a tiny SD 1.x model installs it
    with caplog.at_level(logging.WARNING, logger="worker"):
        loaded = load_model("tiny", str(tiny_model_dir))
        installed = install_embeddings(loaded, read_embeddings(embeddings_dir))
    # Then another width, an SDXL file and an unsafe pickle are skipped, each named with why
    assert installed == ["cattoy", "civistyle", "lumenstyle", "tripleneg"]
    text = caplog.text
    assert "widestyle.pt skipped" in text and "width 32" in text
    assert "xlstyle.safetensors skipped" in text and "need one tensor" in text
    assert "evil.pt skipped: cannot be read safely" in text


def test_the_png_names_the_embeddings_a_job_used_with_a1111s_short_hash(
    model: LoadedModel, embeddings_dir: Path
) -> None:
    # Given a prompt and negative naming two embeddings (one inside a word, which does not count)
    used = used_embeddings(model, ["Tripleneg portrait, lumenstyles", "blurry, civistyle"])
    # When the PNG is encoded with their TI hashes
    png = encode_png(
        Image.new("RGB", (8, 8)),
        JobSpec(prompt="Tripleneg portrait", seed=1).model_dump(),
        model_name="tiny",
        model_hash=model.model_hash,
        extra_params=ti_hashes_param(used),
    )
    # Then `TI hashes` holds each with the first 12 hex digits of its file's SHA-256
    digest = {
        name: hashlib.sha256((embeddings_dir / FILES[name]).read_bytes()).hexdigest()[:12]
        for name in ("tripleneg", "civistyle")
    }
    assert used == digest
    expected = f'TI hashes: "tripleneg: {digest["tripleneg"]}, civistyle: {digest["civistyle"]}"'
    assert expected in read_png_metadata(png)["parameters"]
    assert ti_hashes_param({}) == []


def test_an_sdxl_embedding_renders_what_diffusers_renders_with_both_encoders(
    tiny_sdxl_dir: Path, embeddings_dir: Path
) -> None:
    # Given the tiny SDXL with the folder installed (only xlstyle fits it)
    sdxl = load_model("tiny-sdxl", str(tiny_sdxl_dir))
    assert install_embeddings(sdxl, read_embeddings(embeddings_dir)) == ["xlstyle"]
    row = replace(ROW, prompt="a lighthouse, xlstyle, sunset")
    # When sdfarm renders it, and diffusers does with clip_l and clip_g loaded per encoder
    ours = render_pass(sdxl, [row], PARAMS).images[0]
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    state = safetensors.torch.load_file(embeddings_dir / "xlstyle.safetensors")
    pipe.load_textual_inversion(
        state["clip_l"], token="xlstyle", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        state["clip_g"],
        token="xlstyle",
        text_encoder=pipe.text_encoder_2,
        tokenizer=pipe.tokenizer_2,
    )
    theirs = sdxl_image(pipe, "euler", row)
    # Then the pixels agree, and the embedding changed the image
    without = render_pass(sdxl, [replace(row, prompt="a lighthouse, , sunset")], PARAMS).images[0]
    print(f"sdxl: max pixel difference vs diffusers {difference(ours, theirs)}")
    assert difference(ours, theirs) <= PIXEL_TOLERANCE
    assert difference(ours, without) > 10


def test_sdfarm_render_uses_embeddings_dir_and_writes_ti_hashes(
    model: LoadedModel, tiny_model_dir: Path, embeddings_dir: Path, tmp_path: Path
) -> None:
    # Given `sdfarm render --embeddings-dir` with a prompt naming an embedding
    out = tmp_path / "out.png"
    argv = ["--model", str(tiny_model_dir), "--prompt", "a lighthouse, lumenstyle", "--seed", "7"]
    argv += ["--steps", "8", "--scheduler", "euler", "--width", "64", "--height", "64"]
    argv += ["--embeddings-dir", str(embeddings_dir), "--out", str(out)]
    # When it renders
    assert worker_cli("render", argv) == 0
    # Then the image is the sampling loop's with the embedding, and the PNG names its hash
    row = replace(ROW, prompt="a lighthouse, lumenstyle", negative_prompt="", seed=7, guidance=7.5)
    ours = render_pass(model, [row], PARAMS).images[0]
    assert difference(np.asarray(Image.open(out).convert("RGB")), ours) == 0
    short = model.embeddings["lumenstyle"]
    assert f'TI hashes: "lumenstyle: {short}"' in read_png_metadata(out.read_bytes())["parameters"]


def test_an_sdxl_refiner_takes_the_clip_g_half(
    tiny_refiner_dir: Path, embeddings_dir: Path
) -> None:
    # Given the tiny refiner, which has only the second text encoder
    refiner = load_model("tiny-refiner", str(tiny_refiner_dir))
    # When the folder is installed, Then the SDXL embedding goes in, its clip_g vectors written
    assert install_embeddings(refiner, read_embeddings(embeddings_dir)) == ["xlstyle"]
    assert refiner.text_encoder is None and refiner.text_encoder_2 is not None
    ids = refiner.tokenizer("xlstyle", add_special_tokens=False).input_ids
    rows = refiner.text_encoder_2.get_input_embeddings().weight[ids]
    assert torch.equal(rows, vectors(8, 2))


def test_an_embeddings_dir_that_is_a_url_is_refused_with_what_to_do() -> None:
    with pytest.raises(ValidationError, match="sync the prefix to a folder"):
        Settings.model_validate({"embeddings_dir": "s3://bucket/embeddings"})
