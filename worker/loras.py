"""LoRAs as adapters of a worker's models: loaded once, kept while there is room, set per pass.

0. Fetch: a LoRA of an S3 library is downloaded to the worker's disk first (worker/
   lora_downloads.py); one whose object changed since it was loaded (a new ETag) loads again.
1. Load (`LoraCache.activate`, for each LoRA of the pass not loaded yet): diffusers' own loaders
   read the file and convert kohya/A1111 keys (`lora_state_dict`), then inject a named PEFT
   adapter into the U-Net and the text encoder(s) (`load_lora_into_unet`,
   `load_lora_into_text_encoder`), exactly as `pipe.load_lora_weights(path, adapter_name=...)`
   does. The text encoders are the modules worker/prompts.py calls, so their adapters apply to
   the pass's prompts without anything there knowing about LoRAs.
2. Make room: loaded LoRAs are kept in least-recently-used order, up to
   `Settings.lora_cache_bytes` of files; beyond it the oldest not in the pass are deleted from
   the modules (`delete_adapters`). So 10,000 jobs with one LoRA pay its load once.
3. Activate: `set_adapters(names, weights)` on every module holding some of them (the weights
   of the job; weight-0 LoRAs are left out, as the compatibility key leaves them out), and
   `disable_lora` for a pass without LoRAs, so it renders as if none had ever been loaded.

With `--compile`, changing the active set changes the adapters' scales, which dynamo guards on;
README.md ("LoRAs") has the measured cost and why sdfarm accepts it rather than hotswapping.
Counters (loads, hits, evictions; downloads) go into the worker's heartbeat, then to /metrics.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
from diffusers.loaders.lora_base import (
    disable_lora_for_text_encoder,
    enable_lora_for_text_encoder,
    set_adapters_for_text_encoder,
)
from diffusers.utils.peft_utils import delete_adapter_layers

from shared.errors import InvalidJob, StorageError
from shared.lora_library import LoraFile, LoraLibrary, lora_short_hash
from worker.lora_downloads import LoraDownloads
from worker.models import LoadedModel

__all__ = ["LoraCache", "LoraSet", "lora_params"]

log = logging.getLogger(__name__)

LoraSet = tuple[tuple[str, float], ...]  # (name, weight), sorted by name: PassParams.loras


@dataclass
class _Loaded:
    model: LoadedModel  # where it is loaded
    adapter: str  # the PEFT adapter's name in the model's modules
    size_bytes: int
    short_hash: str  # A1111's, for `Lora hashes` in the PNG's parameters
    etag: str | None  # of the S3 object it was loaded from; None: a folder's file


class LoraCache:
    """The LoRAs loaded into a worker's models, least recently used first."""

    def __init__(
        self,
        library: LoraLibrary | None,
        max_bytes: int,
        downloads: LoraDownloads | None = None,
    ) -> None:
        self.library = library
        self.max_bytes = max_bytes
        self.downloads = downloads  # an S3 library's files on this disk
        self._loaded: OrderedDict[tuple[str, str], _Loaded] = OrderedDict()  # (model, LoRA)
        self.loads = 0  # LoRA files loaded into a model
        self.hits = 0  # LoRAs a pass needed that were loaded already
        self.evictions = 0  # LoRAs deleted from a model to make room

    def counts(self) -> dict[str, int]:
        """The counters, for the worker's heartbeat."""
        counts = {
            "lora_loads": self.loads,
            "lora_hits": self.hits,
            "lora_evictions": self.evictions,
        }
        return counts | (self.downloads.counts() if self.downloads is not None else {})

    def loaded(self, model: LoadedModel) -> list[str]:
        """The LoRAs loaded into `model`, least recently used first."""
        return [lora for name, lora in self._loaded if name == model.name]

    def activate(self, model: LoadedModel, loras: LoraSet) -> dict[str, str]:
        """Make `loras` the model's active adapters at their weights (none: all off); returns
        each active LoRA's A1111 short hash by name. Raises InvalidJob for a LoRA that is not in
        the library or cannot be loaded into this model, StorageError when its file cannot be
        read."""
        wanted = [(name, weight) for name, weight in loras if weight != 0]
        names = {name for name, _ in wanted}
        for name, _ in wanted:
            key, found = (model.name, name), self._find(name)
            held = self._loaded.get(key)
            if held is not None and held.etag == found.etag:
                self.hits += 1
                self._loaded.move_to_end(key)
                continue
            if held is not None:  # its S3 object changed since: the new bytes replace it
                log.info("LoRA %s changed in the library; loading it again", name)
                _delete(held.model, held.adapter)
                del self._loaded[key]
            path, etag = self._fetch(found)
            self._make_room(model, found.size_bytes, keep=names)
            self._loaded[key] = self._load(model, found, path, etag)
            self.loads += 1
        adapters = [(self._loaded[(model.name, name)].adapter, weight) for name, weight in wanted]
        for module in _lora_modules(model):
            _set_active(module, adapters)
        return {name: self._loaded[(model.name, name)].short_hash for name, _ in wanted}

    def _find(self, name: str) -> LoraFile:
        if self.library is None:
            raise InvalidJob(f"LoRA {name!r}: this worker has no LoRA library (SDFARM_LORA_DIR)")
        found = self.library.get(name)
        if found is None:
            raise InvalidJob(
                f"LoRA {name!r} is not in the worker's library {self.library.location}"
            )
        return found

    def _fetch(self, lora: LoraFile) -> tuple[Path, str | None]:
        """The LoRA's local file and the ETag of its bytes (downloaded for an S3 library)."""
        if lora.url is None:
            return lora.path, None
        if self.downloads is None:
            raise InvalidJob(f"LoRA {lora.name!r}: this worker has no download folder for S3")
        path, etag = self.downloads.local_path(lora)
        if etag != lora.etag and self.library is not None:
            self.library.refresh(force=True)  # the object changed after the listing
        return path, etag

    def _make_room(self, model: LoadedModel, size_bytes: int, *, keep: set[str]) -> None:
        held = sum(entry.size_bytes for entry in self._loaded.values())
        for (model_name, name), entry in list(self._loaded.items()):
            if held + size_bytes <= self.max_bytes:
                return
            if model_name == model.name and name in keep:
                continue  # the pass needs it
            _delete(entry.model, entry.adapter)
            del self._loaded[(model_name, name)]
            held -= entry.size_bytes
            self.evictions += 1
            log.info("LoRA %s unloaded from model %s to make room", name, model_name)

    def _load(self, model: LoadedModel, lora: LoraFile, path: Path, etag: str | None) -> _Loaded:
        adapter = _adapter_name(lora.name)
        started = time.perf_counter()
        try:
            _load_adapter(model, str(path), adapter)
            short_hash = lora_short_hash(path)
        except OSError as e:  # the library's disk (a network share) failed: another try may do
            _delete(model, adapter)
            raise StorageError(f"LoRA {lora.name!r}: cannot read {path}: {e}") from e
        except Exception as e:  # diffusers' and PEFT's errors for a file that does not fit
            _delete(model, adapter)
            raise InvalidJob(
                f"LoRA {lora.name!r} cannot be loaded into model {model.name!r} "
                f"({model.family}): {type(e).__name__}: {e}"
            ) from e
        log.info(
            "LoRA %s (%s layout, %d bytes) loaded into model %s in %.2f s",
            lora.name,
            lora.layout,
            lora.size_bytes,
            model.name,
            time.perf_counter() - started,
        )
        return _Loaded(model, adapter, lora.size_bytes, short_hash, etag)


def lora_params(hashes: Mapping[str, str]) -> list[tuple[str, str]]:
    """A1111's `Lora hashes: "name: hash, ..."` setting for the PNG's parameters."""
    if not hashes:
        return []
    return [("Lora hashes", '"' + ", ".join(f"{n}: {h}" for n, h in hashes.items()) + '"')]


def _adapter_name(name: str) -> str:
    """A PEFT adapter name for a LoRA name: no dots (module dictionaries refuse them), and a
    short digest so that `a.b` and `a_b` stay apart."""
    return f"{re.sub(r'[^0-9A-Za-z_]', '_', name)}_{hashlib.sha1(name.encode()).hexdigest()[:6]}"


def _load_adapter(model: LoadedModel, path: str, adapter: str) -> None:
    """What `pipe.load_lora_weights(path, adapter_name=adapter)` does, on the model's modules."""
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
            if encoder is not None:
                loader.load_lora_into_text_encoder(
                    state_dict, text_encoder=encoder, prefix=prefix, metadata=metadata, **common
                )


def _lora_modules(model: LoadedModel) -> list[torch.nn.Module]:
    return [m for m in (model.unet, model.text_encoder, model.text_encoder_2) if m is not None]


def _set_active(module: Any, adapters: Sequence[tuple[str, float]]) -> None:
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


def _delete(model: LoadedModel, adapter: str) -> None:
    """Remove the adapter from every module of the model that holds it (if any)."""
    for module in _lora_modules(model):
        if adapter not in (getattr(module, "peft_config", None) or {}):
            continue
        holder: Any = module
        with warnings.catch_warnings():
            # PEFT warns when the adapter was active: the next pass sets its own set anyway.
            warnings.filterwarnings("ignore", "Adapter .* was active which is now deleted")
            if hasattr(holder, "delete_adapters"):
                holder.delete_adapters([adapter])
            else:
                delete_adapter_layers(holder, adapter)
