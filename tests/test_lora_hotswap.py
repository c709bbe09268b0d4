"""LoRA slots (worker/lora_slots.py): a compiled U-Net switches LoRA sets without recompiling,
and every image is the one the uncompiled `set_adapters` path renders, pixel for pixel; sets the
slots cannot hold fall back to `set_adapters`, counted."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._dynamo
from safetensors.torch import load_file, save_file
from torch._dynamo.utils import counters

from shared.lora_library import LoraLibrary
from tests.test_loras import VISIBLE, lora_dir, params
from tests.test_samplers import ROW, difference
from worker.levers import Levers
from worker.loras import LoraCache, LoraSet
from worker.main import load_models
from worker.models import LoadedModel, load_model
from worker.sampler import render_pass

__all__ = ["lora_dir"]  # the tiny LoRAs of tests/test_loras.py, a fixture of this module too

pytestmark = pytest.mark.usefixtures("one_torch_thread")

A, B = "sd1-kohya", "sd1-diffusers"  # the two layouts
SETS: list[LoraSet] = [((A, 1.0),), ((B, 1.0),), ((A, 0.5), (B, 1.0)), ()]


def render(cache: LoraCache, model: LoadedModel, loras: LoraSet) -> np.ndarray:
    cache.activate(model, loras)
    image = render_pass(model, [ROW], params(model.family)).images[0]
    assert image is not None
    return image


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    """No graphs from earlier tests, and any recompile an error."""
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def plain(tiny_model_dir: Path, lora_dir: Path) -> tuple[LoraCache, LoadedModel]:
    """Today's path: an uncompiled model whose LoRAs are set with `set_adapters`."""
    return LoraCache(LoraLibrary(lora_dir), 10**9), load_model("plain", str(tiny_model_dir))


@pytest.mark.usefixtures("fresh_dynamo")
def test_a_compiled_unet_switches_lora_sets_without_recompiling(
    tiny_model_dir: Path, lora_dir: Path, plain: tuple[LoraCache, LoadedModel]
) -> None:
    # Given a U-Net with 4 slots, compiled with a CPU-cheap backend, only the first LoRA loaded
    cache = LoraCache(LoraLibrary(lora_dir), 10**9, slots=4, slot_rank=8)
    model = load_model("slots", str(tiny_model_dir))
    cache.prepare(model)
    model.unet.compile(backend="eager")
    # When it renders A, then B (loaded into the compiled U-Net), then both, then none
    images = [render(cache, model, loras) for loras in SETS]
    # Then dynamo compiled the U-Net's graph once (a recompile would have raised)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    # And each image is the uncompiled set_adapters path's, and the LoRAs visibly apply
    for loras, image in zip(SETS, images, strict=True):
        assert difference(image, render(*plain, loras)) == 0, loras
    assert min(difference(image, images[-1]) for image in images[:-1]) > VISIBLE
    # And the switches are counted: A, B, then A and B into slots 0 and 1; none zeroes them
    assert cache.counts() == {
        "lora_loads": 2,
        "lora_hits": 2,
        "lora_evictions": 0,
        "lora_swaps": 4,
        "lora_slot_fallbacks": 0,
        "lora_slot_growths": 0,
    }


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_slots_render_both_layouts_and_the_text_encoders_as_set_adapters_does(
    arch: str, tiny_model_dir: Path, tiny_sdxl_dir: Path, lora_dir: Path
) -> None:
    # Given a model with slots and the same model without, for each tiny architecture
    model_dir = tiny_sdxl_dir if arch == "sdxl" else tiny_model_dir
    library = LoraLibrary(lora_dir)
    slotted = LoraCache(library, 10**9, slots=2, slot_rank=4)
    model = load_model(f"{arch}-slots", str(model_dir))
    slotted.prepare(model)
    reference = (LoraCache(library, 10**9), load_model(f"{arch}-plain", str(model_dir)))
    kohya, peft = f"{arch}-kohya", f"{arch}-diffusers"
    # When each layout, both together at other weights, and none are rendered in turn
    for loras in [((kohya, 1.0),), ((peft, 0.5),), ((kohya, 0.5), (peft, 1.0)), ()]:
        image = render(slotted, model, loras)
        # Then each image is the set_adapters one (U-Net and text encoder parts alike)
        assert difference(image, render(*reference, loras)) == 0, loras
    assert slotted.counts()["lora_slot_fallbacks"] == 0


def test_a_set_the_slots_cannot_hold_falls_back_to_set_adapters_counted(
    tiny_model_dir: Path, lora_dir: Path, plain: tuple[LoraCache, LoadedModel]
) -> None:
    # Given one slot of rank 2, and LoRAs of rank 4
    cache = LoraCache(LoraLibrary(lora_dir), 10**9, slots=1, slot_rank=2)
    model = load_model("one-slot", str(tiny_model_dir))
    cache.prepare(model)
    # When a pass needs two LoRAs, then one of a rank above the slot's, then none
    sets: list[LoraSet] = [((A, 1.0), (B, 1.0)), ((A, 1.0),), ()]
    images = [render(cache, model, loras) for loras in sets]
    # Then the first two fell back to set_adapters and render as it does; none uses the slot
    assert cache.counts()["lora_slot_fallbacks"] == 2
    assert cache.counts()["lora_swaps"] == 0
    for loras, image in zip(sets, images, strict=True):
        assert difference(image, render(*plain, loras)) == 0, loras


def test_a_rank_that_fits_after_a_fallback_goes_back_into_the_slots(
    tiny_model_dir: Path, lora_dir: Path, plain: tuple[LoraCache, LoadedModel]
) -> None:
    # Given one slot of rank 4
    cache = LoraCache(LoraLibrary(lora_dir), 10**9, slots=1, slot_rank=4)
    model = load_model("one-slot-r4", str(tiny_model_dir))
    cache.prepare(model)
    # When two LoRAs (a fallback) are followed by one
    render(cache, model, ((A, 1.0), (B, 1.0)))
    image = render(cache, model, ((B, 0.5),))
    # Then the second pass is in the slot again, and renders as set_adapters does
    assert cache.counts()["lora_slot_fallbacks"] == 1 and cache.counts()["lora_swaps"] == 1
    assert difference(image, render(*plain, ((B, 0.5),))) == 0


def test_an_evicted_lora_loaded_again_is_copied_into_its_slot_again(
    tiny_model_dir: Path, lora_dir: Path, plain: tuple[LoraCache, LoadedModel]
) -> None:
    # Given slots and a byte budget that holds one LoRA
    library = LoraLibrary(lora_dir)
    size = max(library.get(n).size_bytes for n in (A, B))  # type: ignore[union-attr]
    cache = LoraCache(library, size + size // 2, slots=2, slot_rank=4)
    model = load_model("evicting", str(tiny_model_dir))
    cache.prepare(model)
    # When A, B (evicting A) and A again (evicting B) render
    images = [render(cache, model, ((name, 1.0),)) for name in (A, B, A)]
    # Then the loads and evictions are counted as without slots, and every image is right
    counts = cache.counts()
    assert (counts["lora_loads"], counts["lora_evictions"], counts["lora_swaps"]) == (3, 2, 3)
    assert difference(images[2], render(*plain, ((A, 1.0),))) == 0
    assert difference(images[1], render(*plain, ((B, 1.0),))) == 0


def test_a_lora_of_modules_beyond_the_slots_adds_the_slots_there_once(
    tmp_path: Path, tiny_model_dir: Path, lora_dir: Path
) -> None:
    # Given a PEFT LoRA that also adapts a resnet's time projection (outside transformer blocks)
    model = load_model("growing", str(tiny_model_dir))
    tensors = load_file(lora_dir / f"{B}.safetensors")
    layer = model.unet.down_blocks[0].resnets[0].time_emb_proj
    out_features, in_features = layer.weight.shape
    generator = torch.Generator().manual_seed(3)
    key = "unet.down_blocks.0.resnets.0.time_emb_proj"
    tensors[f"{key}.lora_A.weight"] = torch.randn(4, in_features, generator=generator)
    tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, 4, generator=generator)
    save_file(tensors, str(tmp_path / "wide.safetensors"))
    cache = LoraCache(LoraLibrary(tmp_path), 10**9, slots=2, slot_rank=4)
    cache.prepare(model)
    # When it renders, then renders again at another weight
    images = [render(cache, model, (("wide", weight),)) for weight in (1.0, 0.5)]
    # Then the slots grew once, and both images are set_adapters' own
    assert cache.counts()["lora_slot_growths"] == 1
    reference = (LoraCache(LoraLibrary(tmp_path), 10**9), load_model("wide-plain", model.path))
    for weight, image in zip((1.0, 0.5), images, strict=True):
        assert difference(image, render(*reference, (("wide", weight),))) == 0


@pytest.mark.usefixtures("fresh_dynamo")
def test_a_compiled_worker_warms_up_with_its_slots_so_its_first_lora_pass_compiles_nothing(
    tiny_model_dir: Path, lora_dir: Path
) -> None:
    # Given a worker's models loaded with compile on and a LoRA cache with slots
    cache = LoraCache(LoraLibrary(lora_dir), 10**9, slots=2, slot_rank=4)
    levers = Levers(
        compile_unet=True, compile_backend="eager", compile_sizes=((64, 64),), warm_up_rows=1
    )
    model = load_models({"warm": str(tiny_model_dir)}, "cpu", levers, loras=cache)["warm"]
    warmed = counters["stats"]["unique_graphs"]
    # When its first pass with a LoRA renders (a recompile would raise)
    render(cache, model, ((A, 1.0),))
    # Then it ran on the graph the warm-up compiled
    assert warmed >= 1 and counters["stats"]["unique_graphs"] == warmed
