"""The FLOPs of an image, counted by torch on one U-Net call and one VAE decode (bench/gpu.py)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from worker.models import LoadedModel

__all__ = ["count_tflop"]


def _added_cond(model: LoadedModel, size: int, batch: int) -> dict[str, torch.Tensor] | None:
    """SDXL's `text_time` conditioning as the sampler passes it: pooled embeddings and the six
    size numbers per sample; None for SD 1.x/2.x."""
    config = model.unet.config
    if config.get("addition_embed_type") != "text_time":
        return None
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    text_embeds = torch.randn(batch, pooled, device=model.device, dtype=model.dtype)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * batch, device=model.device)
    return {"text_embeds": text_embeds, "time_ids": time_ids.to(model.dtype)}


def count_tflop(model: LoadedModel, size: int, target_steps: int = 50) -> dict[str, float]:
    """FLOPs of one guided U-Net step for one image (the U-Net batch holds its negative and
    positive sample), of one VAE decode, and of an image of `target_steps` steps, in TFLOP."""
    latent = size // model.vae_scale_factor
    channels = model.unet.config.in_channels
    x = torch.randn(2, channels, latent, latent, device=model.device, dtype=model.dtype)
    states = torch.randn(2, 77, model.unet.config.cross_attention_dim, device=model.device)
    added = _added_cond(model, size, 2)
    t = torch.tensor(500.0, device=model.device)
    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            model.unet(
                x,
                t,
                encoder_hidden_states=states.to(model.dtype),
                added_cond_kwargs=added,
                return_dict=False,
            )
        unet = counter.get_total_flops() / 1e12
        counter = FlopCounterMode(display=False)
        with counter:
            model.vae.decode(x[:1].to(model.vae.dtype), return_dict=False)  # SDXL's is float32
        vae = counter.get_total_flops() / 1e12
    return {
        "unet_step_tflop": unet,
        "vae_decode_tflop": vae,
        "image_tflop": target_steps * unet + vae,
    }
