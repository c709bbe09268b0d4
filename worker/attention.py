"""The `attention_backend` lever: which fused SDPA kernel the U-Net's attention runs on CUDA.

torch picks a kernel per call from those enabled (flash, memory-efficient, cuDNN, math). On
Hopper, cuDNN's and flash's differ by shape and version, so the lever can name one (the others
are disabled; math stays enabled as the fallback for what the chosen kernel refuses) or `auto`:
time each at the model's largest attention shape once at start and keep the fastest. `default`
leaves torch's own choice. A process-wide setting, like cuDNN's flags.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

from worker.models import LoadedModel

__all__ = ["BACKENDS", "fastest", "set_attention_backend"]

log = logging.getLogger(__name__)

BACKENDS: dict[str, SDPBackend] = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
_ENABLERS: dict[str, Callable[[bool], None]] = {
    "flash": torch.backends.cuda.enable_flash_sdp,
    "efficient": torch.backends.cuda.enable_mem_efficient_sdp,
    "cudnn": torch.backends.cuda.enable_cudnn_sdp,
    "math": torch.backends.cuda.enable_math_sdp,
}
PROBE_CALLS = 10


def set_attention_backend(model: LoadedModel, name: str, rows: int) -> str:
    """Enable `name`'s kernel (or the fastest, for `auto`) and return the one chosen."""
    if model.device.type != "cuda":
        return "default"  # a CPU has one SDPA path
    if name == "auto":
        name = fastest(_probe_times(model, rows))
        log.info("model %s: fastest attention kernel measured: %s", model.name, name)
    for kernel, enable in _ENABLERS.items():
        enable(name == "default" or kernel in (name, "math"))
    return name


def fastest(times_s: Mapping[str, float | None]) -> str:
    """The kernel of the shortest time; `default` when none ran (None: refused the shape)."""
    ran = {k: t for k, t in times_s.items() if t is not None}
    return min(ran, key=ran.__getitem__) if ran else "default"


def _probe_times(model: LoadedModel, rows: int) -> dict[str, float | None]:
    q = _probe_query(model, rows)
    times: dict[str, float | None] = {}
    for kernel in ("flash", "efficient", "cudnn"):
        try:
            with sdpa_kernel(BACKENDS[kernel]):
                sdpa(q, q, q)  # first call: kernel selection, caches
                torch.cuda.synchronize(model.device)
                started = time.perf_counter()
                for _ in range(PROBE_CALLS):
                    sdpa(q, q, q)
                torch.cuda.synchronize(model.device)
                times[kernel] = (time.perf_counter() - started) / PROBE_CALLS
        except RuntimeError:  # no kernel of that kind for this shape, dtype or device
            times[kernel] = None
    return times


def _probe_query(model: LoadedModel, rows: int) -> torch.Tensor:
    """Self-attention's query at the U-Net's first level with attention, at its native size."""
    config = model.unet.config
    types = list(config.down_block_types)
    level = next((i for i, t in enumerate(types) if "CrossAttn" in t), 0)
    channels = int(config.block_out_channels[level])
    # diffusers' `attention_head_dim` is the head count in SD's and SDXL's configs
    heads_cfg = config.num_attention_heads or config.attention_head_dim
    heads = int(heads_cfg[level] if isinstance(heads_cfg, list | tuple) else heads_cfg)
    side = model.native_px // model.vae_scale_factor // 2**level
    shape = (2 * rows, heads, side * side, channels // heads)
    return torch.randn(shape, device=model.device, dtype=model.dtype)
