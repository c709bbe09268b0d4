"""The farm's LoRA library: a folder of `.safetensors` files, each LoRA named by its file's stem.

Both the API (to refuse an unknown LoRA, or one for another family, at submit) and the workers
(to find the file to load) read it, from the files' JSON headers alone: no torch, no weights.

A LoRA's family comes, in this order, from what its trainer wrote in `__metadata__` (kohya's
`ss_base_model_version`, the model spec's `modelspec.architecture`), from its keys (only SDXL
LoRAs have a second text encoder: kohya's `lora_te1_`/`lora_te2_`, diffusers' `text_encoder_2.`)
and from the width of the text its cross-attention reads (the in-features of `attn2.to_k`: 768
SD 1.x, 1024 SD 2.x, 2048 SDXL) or of its text encoder's layers (768 or 1024). A LoRA none of
these tell (a tiny test LoRA) has family None and is accepted for any model: the worker's load
then says what does not fit.

The library is listed again when the folder's modification time changes (a file added, removed
or renamed), so a LoRA copied in later is usable without a restart; a file's header is read
again only when its size or modification time changes. A file overwritten in place keeps the
folder's time: `refresh(force=True)` reads it again. Only the folder itself is listed, not its
subfolders. An `s3://bucket/prefix` library is shared/lora_s3.py's `S3LoraLibrary`, which lists
the prefix instead (same names, same families, from each object's header).

`lora_short_hash` is the hash A1111 writes into `Lora hashes`: the first 12 hex digits of the
"addnet" hash, the SHA-256 of the file's bytes after its header (so editing the metadata does not
change it), or of `sshs_model_hash` where kohya's trainer stored that same hash in the metadata.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.checkpoint_keys import safetensors_header

__all__ = ["LoraFile", "LoraLibrary", "lora_family", "lora_from_header", "lora_short_hash"]

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
_CROSS_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}  # what attn2.to_k reads: CLIP's states
_TEXT_WIDTH = {768: "sd1", 1024: "sd2"}  # a text-encoder-only LoRA: CLIP ViT-L or OpenCLIP ViT-H
_SDXL_KEYS = ("lora_te1_", "lora_te2_", "text_encoder_2.")
_CROSS_K = re.compile(r"attn2[._]to_k[._](lora_down|lora_A|lora\.down)\.weight$")
_TEXT_Q = re.compile(r"self_attn[._]q_proj[._](lora_down|lora_A|lora_linear_layer\.down)\.weight$")


@dataclass(frozen=True)
class LoraFile:
    """One LoRA of the library, as its header describes it."""

    name: str  # the file's stem, as jobs name it
    path: Path  # the file; for an S3 library's LoRA its key (the worker downloads it: `url`)
    family: str | None  # "sd1", "sd2", "sdxl"; None when the header does not tell
    layout: str  # "kohya" (lora_unet_/lora_te_ keys) or "diffusers" (unet./text_encoder. keys)
    size_bytes: int
    mtime_ns: int  # 0 for an object of an S3 library
    url: str | None = None  # `s3://bucket/key` for an object of an S3 library; None: a file
    etag: str | None = None  # an S3 object's ETag, which changes with its bytes; None: a file


def lora_family(header: dict[str, Any]) -> str | None:
    """The family a LoRA was trained for, told by its header (see the module's docstring)."""
    meta = header.get("__metadata__") or {}
    version = str(meta.get("ss_base_model_version", "")) + str(
        meta.get("modelspec.architecture", "")
    )
    for marker, family in (("sdxl", "sdxl"), ("-xl-", "sdxl"), ("v2", "sd2"), ("v1", "sd1")):
        if marker in version:
            return family
    keys = [key for key in header if key != "__metadata__"]
    if any(key.startswith(_SDXL_KEYS) for key in keys):
        return "sdxl"
    for pattern, widths in ((_CROSS_K, _CROSS_WIDTH), (_TEXT_Q, _TEXT_WIDTH)):
        for key in keys:
            shape = header[key].get("shape") if isinstance(header[key], dict) else None
            if pattern.search(key) and isinstance(shape, list) and len(shape) == 2:
                return widths.get(int(shape[1]))
    return None


def _layout(keys: list[str]) -> str | None:
    if keys and all(key.startswith(("lora_unet_", "lora_te")) for key in keys):
        return "kohya"
    if keys and all(key.startswith(("unet.", "text_encoder")) for key in keys):
        return "diffusers"
    return None


def lora_from_header(
    name: str,
    path: Path,
    header: dict[str, Any],
    size_bytes: int,
    mtime_ns: int = 0,
    *,
    url: str | None = None,
    etag: str | None = None,
) -> LoraFile | None:
    """The library entry told by a header; None when it is not a LoRA sdfarm can load."""
    layout = _layout([key for key in header if key != "__metadata__"])
    if layout is None:
        return None
    family = lora_family(header)
    return LoraFile(name, path, family, layout, size_bytes, mtime_ns, url=url, etag=etag)


def read_lora_file(path: Path) -> LoraFile | None:
    """The library entry of the file at `path`; None when it is not a LoRA sdfarm can load."""
    header = safetensors_header(path)
    if header is None:
        return None
    stat = path.stat()
    return lora_from_header(path.stem, path, header, stat.st_size, stat.st_mtime_ns)


def lora_short_hash(path: Path) -> str:
    """A1111's short hash of a LoRA file (the module's docstring says which hash)."""
    header = safetensors_header(path) or {}
    stored = (header.get("__metadata__") or {}).get("sshs_model_hash")
    if isinstance(stored, str) and len(stored) >= 12:
        return stored[:12]
    with path.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        f.seek(8 + length)
        return hashlib.file_digest(f, "sha256").hexdigest()[:12]


class LoraLibrary:
    """The LoRAs of one folder, by name, listed again when the folder changes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._files: dict[str, LoraFile] = {}
        self._listed_mtime_ns: int | None = None
        self._lock = threading.Lock()  # the API validates batches in several threads

    @property
    def location(self) -> str:
        """Where the library is, for messages."""
        return str(self.root)

    def get(self, name: str) -> LoraFile | None:
        """The LoRA called `name`, looked up after listing the folder again if it changed."""
        self.refresh()
        found = self._files.get(name)
        if found is None:
            found = self._read_missing(name)
            if found is not None:
                with self._lock:
                    self._files[name] = found
        return found

    def _read_missing(self, name: str) -> LoraFile | None:
        # Copied in while the folder was listed, or overwritten in place: neither changes the
        # folder's time once the file exists, so a miss reads the file itself.
        path = self.root / f"{name}{SUFFIX}"
        return read_lora_file(path) if path.is_file() else None

    def names(self) -> list[str]:
        self.refresh()
        return sorted(self._files)

    def snapshot(self) -> dict[str, LoraFile]:
        """Every LoRA by name, as of now (one listing for a whole batch's checks)."""
        self.refresh()
        return dict(self._files)

    def refresh(self, *, force: bool = False) -> None:
        """List the folder again if its modification time changed (one stat otherwise)."""
        try:
            mtime_ns = self.root.stat().st_mtime_ns
        except OSError as e:
            log.warning("LoRA library %s cannot be read: %s", self.root, e)
            return
        with self._lock:
            if not force and mtime_ns == self._listed_mtime_ns:
                return
            self._files = self._listed(self._files)
            self._listed_mtime_ns = mtime_ns

    def _listed(self, before: dict[str, LoraFile]) -> dict[str, LoraFile]:
        files: dict[str, LoraFile] = {}
        with os.scandir(self.root) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if not entry.name.endswith(SUFFIX) or not entry.is_file():
                    continue
                path, stat = Path(entry.path), entry.stat()
                known = before.get(path.stem)
                if known and (known.size_bytes, known.mtime_ns) == (stat.st_size, stat.st_mtime_ns):
                    files[known.name] = known
                    continue
                found = read_lora_file(path)
                if found is None:
                    log.warning("LoRA library: %s is not a LoRA sdfarm reads; skipped", path)
                    continue
                files[found.name] = found
        log.info("LoRA library %s: %d LoRAs", self.root, len(files))
        return files
