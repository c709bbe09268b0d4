"""Fixed LoRA slots in a compiled U-Net, so that switching LoRAs never recompiles it.

dynamo guards on what PEFT's LoRA layers read in their forward: which adapters are active and
their scales (Python floats). `set_adapters` changes both, so a compiled U-Net compiles once per
distinct LoRA set and weight, and past dynamo's cache (8 graphs) new sets run uncompiled. Here
the U-Net instead gets `count` adapters of its own (`sdfarm_slot0`, ...) before it is compiled:

1. Slots (`LoraSlots(unet, count, rank)`): each slot is a PEFT adapter of `rank` on every linear
   and 1x1 convolution of the U-Net's transformer blocks (what kohya's trainer adapts), all of
   them always active, their scales 0-dim tensors (as PEFT's `prepare_model_for_compiled_hotswap`
   makes them), their weights zero. The graph dynamo compiles reads the slots and nothing else.
2. Take (`take`, after a LoRA is loaded as its own adapter, worker/loras.py): its U-Net tensors
   (each layer's lora_A, lora_B, rank, alpha) are kept aside and the adapter is deleted from the
   U-Net again, since dynamo also guards on how many adapters each layer holds. A LoRA adapting
   modules the slots lack (a LoCon's resnet convolutions) first adds the slots there: one
   recompile, logged and counted (`growths`), after which LoRAs of that shape switch for free.
3. Fill (`fill`, each pass): the pass's LoRAs, in the set's order, are copied in place into slots
   0, 1, ... (lora_A into the first rows, lora_B into the first columns, zero padding beyond the
   LoRA's rank) and each slot's scale filled with what PEFT's `set_scale` would set (weight x
   alpha / rank); unused slots are zeroed. A slot already holding that LoRA keeps its weights and
   only its scale is refilled. The sum runs in the order `set_adapters` would run it, so the
   images are those of the `set_adapters` path.

A set that cannot fit (`misfit`: more LoRAs than slots, a rank above the slots', DoRA or a LoRA
bias) is for the caller to render with `set_adapters`, recompiling as before.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer

from worker.lora_adapters import delete_from

__all__ = ["LoraSlots", "slot_targets"]

log = logging.getLogger(__name__)

SLOT_PREFIX = "sdfarm_slot"


def slot_targets(unet: torch.nn.Module) -> list[str]:
    """The modules slots adapt from the start: every linear and 1x1 convolution of the U-Net's
    transformer blocks (attention projections, feed-forward, proj_in/out)."""
    return [
        name
        for name, module in unet.named_modules()
        if ".attentions." in f".{name}"
        and (
            isinstance(module, torch.nn.Linear)
            or (isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1))
        )
    ]


@dataclass(frozen=True)
class _Part:
    """One layer's part of a LoRA, as PEFT loaded it."""

    down: torch.Tensor  # lora_A's weight: (rank, in, ...)
    up: torch.Tensor  # lora_B's weight: (out, rank, ...)
    scale: float  # PEFT's scale at weight 1: alpha / rank (alpha / sqrt(rank) with rsLoRA)


class LoraSlots:
    """`count` always-active adapters of one rank in a U-Net, filled in place per pass."""

    def __init__(self, unet: torch.nn.Module, count: int, rank: int) -> None:
        self.unet, self.count, self.rank = unet, count, rank
        self.names = [f"{SLOT_PREFIX}{index}" for index in range(count)]
        self._layers: dict[str, LoraLayer] = {}  # the layers holding the slots, by module name
        self._held: list[tuple[str, float] | None] = [None] * count  # (adapter, weight) per slot
        self._taken: dict[str, dict[str, _Part]] = {}  # adapter -> module name -> its part
        self._misfits: dict[str, str] = {}  # adapter -> why no slot can hold it
        # Something else made other adapters active (a load, a `set_adapters` fallback pass):
        # the next fill makes the slots active again (a walk over every layer, so only then).
        self.displaced = True
        self.swaps = 0  # slots whose weights were copied from a LoRA
        self.growths = 0  # times the slots were added to modules a LoRA adapts (a recompile)
        self._add(slot_targets(unet))

    def take(self, adapter: str) -> None:
        """Keep the freshly loaded adapter's U-Net tensors aside and delete it from the U-Net
        (adding the slots first to modules it adapts that they lack)."""
        holding = {
            name: module
            for name, module in self.unet.named_modules()
            if isinstance(module, LoraLayer) and adapter in module.lora_A
        }
        lacking = [name for name in holding if name not in self._layers]
        if lacking:
            self._add(lacking)
            self.growths += 1
            log.info("LoRA slots added to %d modules for %s (one recompile)", len(lacking), adapter)
        self._taken[adapter] = {name: _part(layer, adapter) for name, layer in holding.items()}
        for layer in holding.values():
            misfit = self._misfit(layer, adapter)
            if misfit is not None:
                self._misfits[adapter] = misfit
                break
        delete_from(self.unet, adapter)
        self.displaced = True

    def misfit(self, adapters: Sequence[tuple[str, float]]) -> str | None:
        """Why these adapters cannot be filled into the slots, or None when they can."""
        if len(adapters) > self.count:
            return f"{len(adapters)} LoRAs, above the {self.count} slots (lora_slots)"
        untaken = [a for a, _ in adapters if a not in self._taken]
        if untaken:
            return f"{', '.join(untaken)} loaded before the slots were made"
        return next((self._misfits[a] for a, _ in adapters if a in self._misfits), None)

    def fill(self, adapters: Sequence[tuple[str, float]]) -> None:
        """Copy `adapters` (taken, fitting: see `misfit`) into slots 0, 1, ... at their weights
        and zero the rest; then make the slots the U-Net's only active adapters."""
        wanted: list[tuple[str, float] | None] = [*adapters, *[None] * (self.count - len(adapters))]
        with torch.no_grad():
            for index, (slot, entry) in enumerate(zip(self.names, wanted, strict=True)):
                held = self._held[index]
                if entry == held:
                    continue
                same_lora = entry is not None and held is not None and entry[0] == held[0]
                parts = self._taken[entry[0]] if entry is not None else {}
                weight = entry[1] if entry is not None else 0.0
                for name, layer in self._layers.items():
                    _fill_layer(layer, slot, parts.get(name), weight, scale_only=same_lora)
                self._held[index] = entry
                self.swaps += int(entry is not None and not same_lora)
        if self.displaced:
            self.restore()

    def restore(self) -> None:
        """Make the slots the U-Net's active adapters again (after a load or a `set_adapters`
        pass changed them), in the same state as when it was compiled."""
        for module in self.unet.modules():
            if isinstance(module, BaseTunerLayer):
                module.enable_adapters(True)
                module.set_adapter(self.names)
        self.displaced = False

    def forget(self, adapter: str) -> None:
        """The LoRA is unloaded: drop its tensors; a slot holding it no longer counts as filled."""
        self._taken.pop(adapter, None)
        self._misfits.pop(adapter, None)
        self._held = [None if h is not None and h[0] == adapter else h for h in self._held]

    def _misfit(self, layer: LoraLayer, adapter: str) -> str | None:
        if layer.r[adapter] > self.rank:
            return f"{adapter} has rank {layer.r[adapter]}, above the slots' {self.rank}"
        if adapter in layer.lora_variant or layer.lora_bias.get(adapter, False):
            return f"{adapter} is a DoRA or has a LoRA bias, which slots cannot hold"
        return None

    def _add(self, targets: list[str]) -> None:
        config = LoraConfig(r=self.rank, lora_alpha=self.rank, target_modules=targets)
        with warnings.catch_warnings():
            # PEFT warns that the U-Net gets more than one adapter: holding several is the point.
            warnings.filterwarnings("ignore", "Already found a `peft_config`", UserWarning)
            for slot in self.names:
                inject_adapter_in_model(config, self.unet, adapter_name=slot)
        self._layers = {
            name: module
            for name, module in self.unet.named_modules()
            if isinstance(module, LoraLayer) and self.names[0] in module.lora_A
        }
        with torch.no_grad():
            for layer in self._layers.values():
                for slot in self.names:
                    if not isinstance(layer.scaling[slot], torch.Tensor):  # a new one: zero
                        up = _weight(layer, "lora_B", slot)
                        layer.scaling[slot] = torch.tensor(0.0, device=up.device)
                        up.zero_()
        self._held = [None] * self.count  # fill every slot again at the next pass
        self.restore()


def _part(layer: LoraLayer, adapter: str) -> _Part:
    rank = layer.r[adapter]
    root = math.sqrt(rank) if layer.use_rslora.get(adapter, False) else rank
    return _Part(
        _weight(layer, "lora_A", adapter).detach(),
        _weight(layer, "lora_B", adapter).detach(),
        layer.lora_alpha[adapter] / root,
    )


def _fill_layer(
    layer: LoraLayer, slot: str, part: _Part | None, weight: float, *, scale_only: bool
) -> None:
    """One layer's slot: the part's weights, rank-padded with zeros, and its scale at the weight
    (as PEFT's `set_scale` computes it); zero where the LoRA does not adapt the layer."""
    down, up = _weight(layer, "lora_A", slot), _weight(layer, "lora_B", slot)
    scaling = layer.scaling[slot]
    assert isinstance(scaling, torch.Tensor)  # made one in `_add`
    if part is None:
        up.zero_()
        scaling.fill_(0.0)
        return
    scaling.fill_(weight * part.scale)
    if scale_only:
        return
    rank = part.down.shape[0]
    down.zero_()
    up.zero_()
    down[:rank].copy_(part.down)
    up[:, :rank].copy_(part.up)


def _weight(layer: LoraLayer, matrix: str, adapter: str) -> torch.Tensor:
    """`layer.lora_A[adapter].weight` (or lora_B's), typed."""
    weight = getattr(layer, matrix)[adapter].weight
    assert isinstance(weight, torch.Tensor)
    return weight
