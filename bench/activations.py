"""Peak activation bytes of one guided U-Net call per model family, counted on the CPU.

`worker/passes.py` sizes a pass to GPU memory with a per-family figure: peak U-Net activation
bytes per output pixel per row (two samples with guidance). This script measures it without a
GPU: it builds each family's full-size U-Net from its published config with random weights, in
bfloat16 (2 bytes an element, as fp16), and calls it once under `torch.inference_mode()` as
`worker/sampler.py` does, batch 2 (uncond, cond), with SDXL's `added_cond_kwargs`.

What is counted (`LiveBytes`): every storage an op returns, once (views share it), from the op
that made it until it is freed; the peak of their sum. Weights, buffers and the call's inputs,
which exist before the call, are not. Memory an op uses inside itself is not an op's output and
is not counted: that is right for attention, which runs through `F.scaled_dot_product_attention`
(diffusers' `AttnProcessor2_0`) and on a GPU never holds the tokens² matrix; it also leaves out
convolution workspace and the caching allocator's rounding, which `passes.py`'s margin covers.

    python bench/activations.py                       # 256, 512 and 768 px, every family
    python bench/activations.py --sizes 256,512 --families sd1,sdxl
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import math
import platform
import sys
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, not installed

import diffusers
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bench.sd15 import UNET_CONFIG as SD15_UNET
from bench.sdxl import UNET_CONFIG as SDXL_UNET

__all__ = ["LiveBytes", "Measurement", "build_unet", "guided_inputs", "measure_call"]

CONFIGS = Path(__file__).resolve().parent.parent / "worker" / "configs"
DEFAULT_SIZES = (256, 512, 768)
TOP_AT_PEAK = 6  # the largest storages alive at the peak, kept to show what makes it


def _published(family_dir: str) -> dict[str, Any]:
    """A U-Net config.json as the worker ships it (copied from the published model)."""
    config: dict[str, Any] = json.loads((CONFIGS / family_dir / "unet" / "config.json").read_text())
    return {key: value for key, value in config.items() if not key.startswith("_")}


# family (worker/passes.py's key) -> (label, U-Net config, size numbers in `time_ids`)
FAMILIES: dict[str, tuple[str, Callable[[], dict[str, Any]], int]] = {
    "sd1": ("SD 1.5", lambda: dict(SD15_UNET), 0),
    # stabilityai/stable-diffusion-2-1's U-Net: SD 1.5's with OpenCLIP-H's 1024-wide states, 64
    # channels a head and linear projections (worker/configs/sd2-v has the same values).
    "sd2": ("SD 2.1 (768 v)", lambda: _published("sd2-v"), 0),
    "sdxl": ("SDXL 1.0 base", lambda: dict(SDXL_UNET), 6),
    "sdxl-refiner": ("SDXL 1.0 refiner", lambda: _published("sdxl-refiner"), 5),
}


class LiveBytes(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Counts the bytes of the storages ops return while they live, and their peak.

    A storage is counted when an op first returns it (a view's storage is its base's: counted
    once, by its address) and uncounted when it is freed: `weakref.finalize` on the storage's
    Python object, which torch keeps alive exactly as long as the storage itself. Storages that
    exist before (`exclude`: weights, buffers, inputs) are never counted, even when an op
    returns a view of one (`linear`'s transposed weight).
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._live: dict[int, tuple[int, str, tuple[int, ...]]] = {}  # address -> bytes, op, shape
        self.live_bytes = 0
        self.peak_bytes = 0
        self.top_at_peak: list[tuple[int, str, tuple[int, ...]]] = []
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket.__name__)
        self.ops[name] += 1
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._see(leaf, name)
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
            self.top_at_peak = sorted(self._live.values(), reverse=True)[:TOP_AT_PEAK]
        return out

    def _see(self, tensor: torch.Tensor, op: str) -> None:
        storage = tensor.untyped_storage()
        address, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or address in self._excluded or address in self._live:
            return
        self._live[address] = (nbytes, op, tuple(tensor.shape))
        self.live_bytes += nbytes
        weakref.finalize(storage, self._freed, address).atexit = False

    def _freed(self, address: int) -> None:
        nbytes, _op, _shape = self._live.pop(address)
        self.live_bytes -= nbytes


def build_unet(config: dict[str, Any], dtype: torch.dtype, seed: int = 0) -> UNet2DConditionModel:
    """A U-Net of this config with random weights on the CPU, allocated once, in `dtype`.

    Built on the meta device, cast there, then given memory: no float32 copy of 2.6 B
    parameters, and no minute of diffusers' initialisers. Weights are drawn with a standard
    deviation of 1/sqrt(fan-in) so activations keep a sane scale (memory does not depend on it).
    """
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    torch.nn.Module.to(unet, dtype=dtype)
    unet.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*unet.named_parameters(), *unet.named_buffers()]:
            if tensor.dim() > 1:
                fan_in = tensor[0].numel()
                tensor.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=generator)
            elif name.endswith("weight"):
                tensor.fill_(1.0)  # norm scales
            else:
                tensor.zero_()  # biases
    unet.set_attn_processor(AttnProcessor2_0())  # diffusers' default, as worker/levers.py sets
    unet.eval()
    unet.requires_grad_(False)
    return unet


def guided_inputs(
    unet: UNet2DConditionModel,
    width_px: int,
    height_px: int,
    *,
    vae_scale_factor: int = 8,
    time_ids: int = 0,
) -> dict[str, Any]:
    """One row's U-Net call with guidance, as worker/sampler.py makes it: batch 2, 77 tokens.

    `time_ids`: SDXL's size numbers (6 for the base, 5 for the refiner; 0: no `text_time`).
    """
    dtype, config = unet.dtype, unet.config
    latent = (2, config.in_channels, height_px // vae_scale_factor, width_px // vae_scale_factor)
    added_cond = None
    if time_ids:
        pooled = config.projection_class_embeddings_input_dim
        pooled -= time_ids * config.addition_time_embed_dim
        added_cond = {
            "text_embeds": torch.randn(2, pooled, dtype=dtype),
            "time_ids": torch.tensor([[float(height_px)] * time_ids] * 2, dtype=dtype),
        }
    return {
        "sample": torch.randn(latent, dtype=dtype),
        "timestep": torch.tensor(999.0),
        "encoder_hidden_states": torch.randn(2, 77, config.cross_attention_dim, dtype=dtype),
        "added_cond_kwargs": added_cond,
        "return_dict": False,
    }


class Measurement:
    """One call's peak live activation bytes, what was alive then, and the ops it ran."""

    def __init__(self, counter: LiveBytes, seconds: float) -> None:
        self.peak_bytes = counter.peak_bytes
        self.seconds = seconds
        self.top_at_peak = counter.top_at_peak
        self.ops = counter.ops


def measure_call(unet: UNet2DConditionModel, inputs: dict[str, Any]) -> Measurement:
    """Call the U-Net once under inference mode, counting live activation bytes."""
    existing = [*unet.parameters(), *unet.buffers()]
    existing += [t for t in tree_leaves(inputs) if isinstance(t, torch.Tensor)]
    counter = LiveBytes(exclude=existing)
    started = time.perf_counter()
    with torch.inference_mode(), counter:
        out = unet(**inputs)
        del out  # freed inside the mode, so the counter ends at zero
    return Measurement(counter, time.perf_counter() - started)


def _attention_check(ops: Counter[str]) -> str:
    """Which attention kernel ran: a fused one, or the math path that holds the scores."""
    fused = sum(n for op, n in ops.items() if op.lstrip("_").startswith("scaled_dot_product"))
    softmax = ops["_softmax"] + ops["softmax"]
    return f"{fused} fused SDPA calls, {softmax} softmax"


def run(families: list[str], sizes: list[int], dtype: torch.dtype) -> dict[str, Any]:
    """Measure each family at each size; the slope between sizes is bytes per output pixel."""
    results: dict[str, Any] = {}
    for family in families:
        label, config, time_ids = FAMILIES[family]
        started = time.perf_counter()
        unet = build_unet(config(), dtype)
        build_s = time.perf_counter() - started
        params = sum(p.numel() for p in unet.parameters())
        print(f"{label}: built {params / 1e6:,.1f} M parameters in {build_s:.0f} s", flush=True)
        rows: list[dict[str, Any]] = []
        for size in sizes:
            m = measure_call(unet, guided_inputs(unet, size, size, time_ids=time_ids))
            pixels = size * size
            rows.append(
                {
                    "size": size,
                    "pixels": pixels,
                    "peak_bytes": m.peak_bytes,
                    "bytes_per_pixel": m.peak_bytes / pixels,
                    "seconds": round(m.seconds, 1),
                    "attention": _attention_check(m.ops),
                    "top_at_peak": [
                        {"bytes": b, "op": op, "shape": list(shape)}
                        for b, op, shape in m.top_at_peak
                    ],
                }
            )
            print(
                f"  {size}x{size}: peak {m.peak_bytes / 2**20:,.1f} MiB, "
                f"{m.peak_bytes / pixels:,.0f} B/px, {m.seconds:.0f} s ({rows[-1]['attention']})",
                flush=True,
            )
        slopes = [
            (b["peak_bytes"] - a["peak_bytes"]) / (b["pixels"] - a["pixels"])
            for a, b in itertools.pairwise(rows)
        ]
        results[family] = {
            "label": label,
            "parameters": params,
            "build_s": round(build_s, 1),
            "time_ids": time_ids,
            "sizes": rows,
            "slopes_bytes_per_pixel": slopes,
        }
        del unet
        gc.collect()  # the next family's weights go where these were
    return results


def _table(results: dict[str, Any]) -> str:
    lines = [f"{'family':<14}{'size':>10}{'peak MiB':>11}{'B/px':>8}{'slope B/px':>12}"]
    for family, result in results.items():
        slopes = [None, *result["slopes_bytes_per_pixel"]]
        for row, slope in zip(result["sizes"], slopes, strict=True):
            size = f"{row['size']}x{row['size']}"
            shown = "" if slope is None else f"{slope:,.0f}"
            lines.append(
                f"{family:<14}{size:>10}{row['peak_bytes'] / 2**20:>11,.1f}"
                f"{row['bytes_per_pixel']:>8,.0f}{shown:>12}"
            )
    return "\n".join(lines)


def _sizes(text: str) -> list[int]:
    sizes = [int(part) for part in text.split(",") if part]
    for size in sizes:
        if size <= 0 or size % 64:
            raise argparse.ArgumentTypeError(f"each size has to be a multiple of 64, got {size}")
    return sorted(sizes)


def _families(text: str) -> list[str]:
    names = [part for part in text.split(",") if part]
    for name in names:
        if name not in FAMILIES:
            raise argparse.ArgumentTypeError(f"unknown family {name!r}: one of {sorted(FAMILIES)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--sizes", type=_sizes, default=list(DEFAULT_SIZES), help="square sizes, px (256,512,768)"
    )
    parser.add_argument(
        "--families", type=_families, default=list(FAMILIES), help=",".join(FAMILIES)
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: dated)")
    args = parser.parse_args(argv)
    today = datetime.date.today().isoformat()
    out: Path = args.out or Path(__file__).parent / "results" / f"activations-cpu-{today}.json"
    started = time.perf_counter()
    results = run(args.families, args.sizes, torch.bfloat16)
    print(_table(results))
    report = {
        "what": "peak live activation bytes of one U-Net call, batch 2 (one row with guidance)",
        "dtype": "bfloat16 (2 bytes an element, standing in for fp16)",
        "date": today,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "total_s": round(time.perf_counter() - started, 1),
        "families": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
