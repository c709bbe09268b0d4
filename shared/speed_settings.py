"""The worker's speed levers as settings (part of `shared.config.Settings`).

worker/levers.py says what each lever does and why it is set as it is; a lever not yet measured
on a GPU stays off, and `bench/gpu.py --levers all` measures each one on and off in one run.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

__all__ = ["SpeedSettings"]


class SpeedSettings(BaseModel):
    """The levers; `Settings` inherits them, so they read `SDFARM_`-prefixed variables too."""

    # torch.compile the U-Net and warm it up at start (`sdfarm worker --compile`).
    compile_unet: bool = False
    # Sizes (`WxH,...`) the compiled U-Net is warmed up for, at every pass size to max_batch.
    compile_sizes: str = Field(default="512x512", pattern=r"^\d+x\d+(,\d+x\d+)*$")
    # Let cuDNN time its convolution algorithms once per shape (a farm sees few shapes).
    cudnn_benchmark: bool = True
    # TF32 for float32 matmuls and convolutions: no gain with fp16 weights, and with float32
    # weights it makes an image depend on its batch-mates by ~10 levels.
    tf32: bool = False
    # The VAE decodes in blended tiles above this width or height, so memory stays bounded.
    vae_tiling_above_px: int = Field(default=1024, ge=64)
    # Most rows x width x height in one pass; unset: estimated from free GPU memory (no limit
    # on a CPU). A chunk that does not fit renders in several passes.
    max_pass_pixels: int | None = Field(default=None, ge=64 * 64)
    # Levers not yet measured on a GPU stay off; `bench/gpu.py --levers all` measures each one
    # on and off in one run (worker/levers.py says what each does).
    # SDPA kernel: default (torch's choice), flash, efficient, cudnn, math, or auto (the fastest
    # at the model's attention shape, timed at start). CUDA only.
    attention_backend: str = Field(
        default="default", pattern=r"^(default|auto|flash|efficient|cudnn|math)$"
    )
    # VAE slicing on CUDA: on (one image at a time), auto (whole passes where free memory
    # allows, sliced where not, chosen at start), off.
    vae_slicing: str = Field(default="on", pattern=r"^(on|auto|off)$")
    # torch.compile the VAE's decoder too (with the U-Net's backend and mode).
    compile_vae: bool = False
    # torch.compile's backend (eager only traces: a CPU checks the path in seconds) and mode
    # (reduce-overhead: CUDA graphs; max-autotune: Triton templates timed, and CUDA graphs).
    compile_backend: str = Field(default="inductor", pattern=r"^(inductor|eager|aot_eager)$")
    compile_mode: str = Field(
        default="default",
        pattern=r"^(default|reduce-overhead|max-autotune|max-autotune-no-cudagraphs)$",
    )
    # Compiled graphs only for the shapes warmed up (compile_sizes); any other size runs eager
    # instead of compiling a new graph while its first job waits.
    compile_only_warm_sizes: bool = False
    # Where compiled graphs persist across restarts (Inductor's caches and torch's cache
    # artifacts): a restarted worker on a machine that compiled before loads them. Unset: none.
    compile_cache_dir: Path | None = None
    # LMS's coefficients tabulated once per schedule instead of integrated on the host each step.
    lms_precompute: bool = False
    # A compiled worker's U-Net gets this many fixed LoRA slots (worker/lora_slots.py), so that
    # switching LoRA sets never recompiles it; a pass with more LoRAs uses set_adapters (which
    # recompiles). 0: set_adapters always. Uncompiled workers never use slots.
    lora_slots: int = Field(default=4, ge=0, le=16)
    # The slots' rank: a LoRA of a higher rank falls back to set_adapters. Each slot costs
    # 2 x rank x (in + out) FLOPs per token on every adapted layer, used or not.
    lora_slot_rank: int = Field(default=32, ge=1, le=1024)
