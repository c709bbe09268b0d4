"""Reading a folder of textual-inversion embeddings: A1111's, civitai's and diffusers' files.

The formats, told apart by their keys as A1111 tells them (`EmbeddingDatabase.load_from_file`):

- A1111 `.pt`: a dict whose `string_to_param` holds one tensor under `*`, (vectors, width).
- SDXL `.safetensors` (A1111, civitai): `clip_l` (for the first encoder) and `clip_g` (for the
  second), each (vectors, width), with the same number of vectors.
- Any other dict of exactly one tensor: civitai's `.safetensors` with `emb_params`, diffusers'
  `learned_embeds.bin`/`.safetensors` (`{"<token>": tensor}`); a 1-D tensor is one vector.

An embedding is named by its file's stem, as in A1111, except diffusers' `learned_embeds.*`, which
takes its folder's name (`cat-toy/learned_embeds.bin` is `cat-toy`): a concepts folder is named
by its folder. Pickles (`.pt`, `.bin`) load with `torch.load(weights_only=True)`, so a file that
needs anything but tensors and plain containers to unpickle is refused, never run.

The short hash is A1111's (`hashes.sha256(path, "textual_inversion/" + name)`, `set_hash`): the
first 12 hex digits of the SHA-256 of the whole file, what A1111 writes in `TI hashes`.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from shared.errors import ConfigError

__all__ = ["SUFFIXES", "Embedding", "read_embedding", "read_embeddings"]

log = logging.getLogger(__name__)

SUFFIXES = (".pt", ".bin", ".safetensors")
DIFFUSERS_STEM = "learned_embeds"  # diffusers' file name; the folder names the concept


class UnusableEmbedding(ValueError):
    """A file in the embeddings folder that is not an embedding sdfarm can use (skipped)."""


@dataclass(frozen=True)
class Embedding:
    """One textual-inversion file: its vectors, float32 on the CPU, and A1111's short hash."""

    name: str
    path: Path
    short_hash: str  # the first 12 hex digits of the file's SHA-256
    vectors: torch.Tensor | None = None  # (n, width): SD 1.x/2.x, one text encoder
    clip_l: torch.Tensor | None = None  # SDXL: (n, width of the first encoder)
    clip_g: torch.Tensor | None = None  # SDXL: (n, width of the second encoder)

    @property
    def count(self) -> int:
        """How many token positions the embedding takes in a prompt."""
        tensor = self.vectors if self.vectors is not None else self.clip_g
        assert tensor is not None
        return int(tensor.shape[0])

    def describe(self) -> str:
        """Its shape in words, for the message that says why a model skipped it."""
        if self.vectors is not None:
            return f"{self.count} vector(s) of width {self.vectors.shape[1]}"
        assert self.clip_l is not None and self.clip_g is not None
        return (
            f"an SDXL embedding ({self.count} vector(s), clip_l width {self.clip_l.shape[1]}, "
            f"clip_g width {self.clip_g.shape[1]})"
        )


def read_embeddings(folder: Path) -> list[Embedding]:
    """Every usable embedding under `folder` (sub-folders included), by name; a file that is not
    one is skipped with a warning naming it and why, as is a second file of the same name."""
    if not folder.is_dir():
        raise ConfigError(f"embeddings_dir {str(folder)!r} is not a folder (SDFARM_EMBEDDINGS_DIR)")
    found: dict[str, Embedding] = {}
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    for path in files:
        if path.suffix.lower() not in SUFFIXES or path.stat().st_size == 0:
            continue
        try:
            embedding = read_embedding(path)
        except UnusableEmbedding as e:
            log.warning("embedding %s skipped: %s", path, e)
            continue
        if embedding.name in found:
            log.warning(
                "embedding %s skipped: %s already holds the name %r",
                path,
                found[embedding.name].path,
                embedding.name,
            )
            continue
        found[embedding.name] = embedding
    log.info("%d embedding(s) in %s: %s", len(found), folder, ", ".join(found) or "none")
    return [found[name] for name in sorted(found, key=str.lower)]


def read_embedding(path: Path) -> Embedding:
    """The embedding in one file; UnusableEmbedding says why a file is not one."""
    name = path.parent.name if path.stem == DIFFUSERS_STEM else path.stem
    data = _load(path)
    with path.open("rb") as f:
        short_hash = hashlib.file_digest(f, "sha256").hexdigest()[:12]
    if not isinstance(data, dict):
        raise UnusableEmbedding(f"holds a {type(data).__name__}, not a dict of tensors")
    if "string_to_param" in data:  # A1111
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise UnusableEmbedding("its string_to_param must hold exactly one tensor")
        return Embedding(name, path, short_hash, vectors=_matrix(next(iter(params.values()))))
    if "clip_l" in data and "clip_g" in data:  # SDXL
        clip_l, clip_g = _matrix(data["clip_l"]), _matrix(data["clip_g"])
        if clip_l.shape[0] != clip_g.shape[0]:
            raise UnusableEmbedding(
                f"clip_l has {clip_l.shape[0]} vectors and clip_g {clip_g.shape[0]}; "
                "they must have the same number"
            )
        return Embedding(name, path, short_hash, clip_l=clip_l, clip_g=clip_g)
    tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
    if len(data) == 1 and len(tensors) == 1:  # civitai's emb_params, diffusers' {token: tensor}
        return Embedding(name, path, short_hash, vectors=_matrix(tensors[0]))
    keys = ", ".join(sorted(map(str, data))[:5])
    raise UnusableEmbedding(
        f"keys {keys} are none of an embedding's: string_to_param (A1111), clip_l and clip_g "
        "(SDXL), or a single tensor (emb_params, diffusers' learned_embeds)"
    )


def _load(path: Path) -> Any:
    """The file's contents; any failure to read it (corrupt, or a pickle that needs more than
    tensors) is an UnusableEmbedding naming the cause."""
    try:
        if path.suffix.lower() == ".safetensors":
            return safetensors.torch.load_file(path, device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # wrapped: the folder's other files still load
        raise UnusableEmbedding(f"cannot be read safely ({type(e).__name__}: {e})") from e


def _matrix(value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dim() not in (1, 2) or value.numel() == 0:
        raise UnusableEmbedding("its vectors must be a non-empty tensor of 1 or 2 dimensions")
    if not value.is_floating_point():
        raise UnusableEmbedding(f"its vectors are {value.dtype}, not floating point")
    matrix = value.detach().to(dtype=torch.float32, device="cpu")
    return matrix.unsqueeze(0) if matrix.dim() == 1 else matrix
