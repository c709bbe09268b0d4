"""PEFT adapters of a model's modules (worker/loras.py's hands): load a LoRA file into them as
diffusers' `load_lora_weights` does, activate a set with `set_adapters`, delete one."""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
from diffusers.loaders.lora_base import (
    disable_lora_for_text_encoder,
    enable_lora_for_text_encoder,
    set_adapters_for_text_encoder,
)
from diffusers.utils.peft_utils import delete_adapter_layers

from worker.models import LoadedModel

__all__ = [
    "adapter_name",
    "delete_adapter",
    "delete_from",
    "load_adapter",
    "lora_modules",
    "set_active",
]


def adapter_name(name: str) -> str:
    """A PEFT adapter name for a LoRA name: no dots (module dictionaries refuse them), and a
    short digest so that `a.b` and `a_b` stay apart."""
    return f"{re.sub(r'[^0-9A-Za-z_]', '_', name)}_{hashlib.sha1(name.encode()).hexdigest()[:6]}"


def load_adapter(model: LoadedModel, path: str, adapter: str, *, unet_only: bool = False) -> None:
    """What `pipe.load_lora_weights(path, adapter_name=adapter)` does, on the model's modules
    (`unet_only`: on its U-Net alone)."""
    sdxl = model.text_encoder_2 is not None
    loader = StableDiffusionXLLoraLoaderMixin if sdxl else StableDiffusionLoraLoaderMixin
    extra = {"unet_config": model.unet.config} if sdxl else {}
    state_dict, alphas, metadata = loader.lora_state_dict(path, return_lora_metadata=True, **extra)
    if not all("lora" in key for key in state_dict):
        raise ValueError("not a LoRA: some of its tensors' names lack 'lora'")
    common: dict[str, Any] = {"network_alphas": alphas, "adapter_name": adapter}
    encoders = (("text_encoder", model.text_encoder), ("text_encoder_2", model.text_encoder_2))
    with warnings.catch_warnings():
        # PEFT warns that a module gets a second adapter: holding several is the point here.
        warnings.filterwarnings("ignore", "Already found a `peft_config`", UserWarning)
        loader.load_lora_into_unet(state_dict, unet=model.unet, metadata=metadata, **common)
        for prefix, encoder in encoders:
            if encoder is not None and not unet_only:
                loader.load_lora_into_text_encoder(
                    state_dict, text_encoder=encoder, prefix=prefix, metadata=metadata, **common
                )


def lora_modules(model: LoadedModel) -> list[torch.nn.Module]:
    return [m for m in (model.unet, model.text_encoder, model.text_encoder_2) if m is not None]


def set_active(module: Any, adapters: Sequence[tuple[str, float]]) -> None:
    """Activate those of `adapters` that `module` holds, at their weights; none: LoRA off."""
    held = getattr(module, "peft_config", None)
    if not held:
        return  # never had an adapter: nothing to switch off
    present = [(name, weight) for name, weight in adapters if name in held]
    text = not hasattr(module, "set_adapters")  # transformers' encoders: diffusers' helpers
    if not present and text:
        disable_lora_for_text_encoder(module)
    elif not present:
        module.disable_lora()
    if not present:
        return
    names, weights = [name for name, _ in present], [weight for _, weight in present]
    if text:
        enable_lora_for_text_encoder(module)
        set_adapters_for_text_encoder(names, module, weights)
    else:
        module.enable_lora()
        module.set_adapters(names, weights)


def delete_adapter(model: LoadedModel, adapter: str) -> None:
    """Remove the adapter from every module of the model that holds it (if any)."""
    for module in lora_modules(model):
        delete_from(module, adapter)


def delete_from(module: torch.nn.Module, adapter: str) -> None:
    """Remove the adapter from one module (a U-Net or a text encoder), if it holds it."""
    if adapter in (getattr(module, "peft_config", None) or {}):
        holder: Any = module
        with warnings.catch_warnings():
            # PEFT warns when the adapter was active: the next pass sets its own set anyway.
            warnings.filterwarnings("ignore", "Adapter .* was active which is now deleted")
            if hasattr(holder, "delete_adapters"):
                holder.delete_adapters([adapter])
            else:
                delete_adapter_layers(holder, adapter)
