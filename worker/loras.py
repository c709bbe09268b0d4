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

With `--compile`, `set_adapters` would recompile the U-Net for every new set and weight (dynamo
guards on the adapters' scales and on which run). A compiled worker's U-Net therefore gets fixed
slots first (`LoraCache.prepare`, worker/lora_slots.py): step 3 copies the pass's LoRAs into them
in place, and the compiled graph never changes. The text encoders are not compiled and keep
`set_adapters`. A set the slots cannot hold (more LoRAs than slots, a higher rank, DoRA) is
rendered with `set_adapters`, logged and counted (`lora_slot_fallbacks`).
Counters (loads, hits, evictions; downloads; slot swaps, fallbacks, growths) go into the worker's
heartbeat, then to /metrics.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from shared.errors import InvalidJob, StorageError
from shared.lora_library import LoraFile, LoraLibrary, lora_short_hash
from worker.lora_adapters import (
    adapter_name,
    delete_adapter,
    delete_from,
    load_adapter,
    lora_modules,
    set_active,
)
from worker.lora_downloads import LoraDownloads
from worker.lora_slots import LoraSlots
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
        *,
        slots: int = 0,
        slot_rank: int = 32,
    ) -> None:
        self.library = library
        self.max_bytes = max_bytes
        self.downloads = downloads  # an S3 library's files on this disk
        self.slot_count, self.slot_rank = slots, slot_rank  # 0 slots: set_adapters only
        self._slots: dict[str, LoraSlots] = {}  # by model name: prepared (compiled) U-Nets
        self._transient: dict[str, list[str]] = {}  # U-Net adapters of a fallback pass, by model
        self.slot_fallbacks = 0  # passes whose set the slots could not hold
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
        if self.slot_count:
            slots = self._slots.values()
            counts |= {
                "lora_swaps": sum(s.swaps for s in slots),
                "lora_slot_fallbacks": self.slot_fallbacks,
                "lora_slot_growths": sum(s.growths for s in slots),
            }
        return counts | (self.downloads.counts() if self.downloads is not None else {})

    def prepare(self, model: LoadedModel) -> None:
        """Give the model's U-Net its LoRA slots (when this cache has any): before it is
        compiled, so the compiled graph has them from the start."""
        if self.library is None or not self.slot_count or model.family == "sdxl-refiner":
            return  # no LoRAs to switch, or a refiner (LoRAs apply to the base)
        if model.name not in self._slots:
            self._slots[model.name] = LoraSlots(model.unet, self.slot_count, self.slot_rank)
            log.info(
                "model %s: %d LoRA slots of rank %d in the U-Net",
                model.name,
                self.slot_count,
                self.slot_rank,
            )

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
        for adapter in self._transient.pop(model.name, []):  # the last pass's fallback
            delete_from(model.unet, adapter)
        for name, _ in wanted:
            key, found = (model.name, name), self._find(name)
            held = self._loaded.get(key)
            if held is not None and held.etag == found.etag:
                self.hits += 1
                self._loaded.move_to_end(key)
                continue
            if held is not None:  # its S3 object changed since: the new bytes replace it
                log.info("LoRA %s changed in the library; loading it again", name)
                self._unload(held)
                del self._loaded[key]
            path, etag = self._fetch(found)
            self._make_room(model, found.size_bytes, keep=names)
            self._loaded[key] = self._load(model, found, path, etag)
            self.loads += 1
        adapters = [(self._loaded[(model.name, name)].adapter, weight) for name, weight in wanted]
        slots = self._slots.get(model.name)
        for module in lora_modules(model):
            if module is not model.unet or slots is None:
                set_active(module, adapters)
        if slots is not None:
            self._activate_slots(model, slots, adapters, [name for name, _ in wanted])
        return {name: self._loaded[(model.name, name)].short_hash for name, _ in wanted}

    def _activate_slots(
        self,
        model: LoadedModel,
        slots: LoraSlots,
        adapters: list[tuple[str, float]],
        names: list[str],
    ) -> None:
        """The U-Net's part of step 3 with slots: fill them; for a set that does not fit, load
        its U-Net parts again for this pass alone and `set_adapters` them."""
        misfit = slots.misfit(adapters)
        if misfit is None:
            slots.fill(adapters)
            return
        self.slot_fallbacks += 1
        log.warning(
            "model %s: the LoRA slots cannot hold this pass's set (%s); rendering it with "
            "set_adapters, which recompiles the U-Net",
            model.name,
            misfit,
        )
        for name, (adapter, _) in zip(names, adapters, strict=True):
            path, _ = self._fetch(self._find(name))  # an S3 download may have left the disk
            try:
                load_adapter(model, str(path), adapter, unet_only=True)
            except OSError as e:
                raise StorageError(f"LoRA {name!r}: cannot read {path} again: {e}") from e
            self._transient.setdefault(model.name, []).append(adapter)
        set_active(model.unet, adapters)
        slots.displaced = True

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
            self._unload(entry)
            del self._loaded[(model_name, name)]
            held -= entry.size_bytes
            self.evictions += 1
            log.info("LoRA %s unloaded from model %s to make room", name, model_name)

    def _unload(self, entry: _Loaded) -> None:
        delete_adapter(entry.model, entry.adapter)
        if (slots := self._slots.get(entry.model.name)) is not None:
            slots.forget(entry.adapter)

    def _load(self, model: LoadedModel, lora: LoraFile, path: Path, etag: str | None) -> _Loaded:
        adapter = adapter_name(lora.name)
        started = time.perf_counter()
        try:
            load_adapter(model, str(path), adapter)
            short_hash = lora_short_hash(path)
            if (slots := self._slots.get(model.name)) is not None:
                slots.take(adapter)  # its U-Net part leaves the U-Net, for the slots
        except OSError as e:  # the library's disk (a network share) failed: another try may do
            delete_adapter(model, adapter)
            raise StorageError(f"LoRA {lora.name!r}: cannot read {path}: {e}") from e
        except Exception as e:  # diffusers' and PEFT's errors for a file that does not fit
            delete_adapter(model, adapter)
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
