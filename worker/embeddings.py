"""Textual-inversion embeddings installed into a model, and which ones a job's prompts used.

Installing works as diffusers' `load_textual_inversion` does: each embedding's name becomes a new
token of the tokenizer, the text encoder's input embeddings grow by one row per vector, and the
rows hold the vectors. So worker/prompts.py, which tokenizes and encodes as before, picks them
up unchanged; a prompt that names no embedding tokenizes to the same ids and encodes bit for bit
as before. An SDXL model gets `clip_l` in the first encoder and `clip_g` in the second, under the
same ids in both tokenizers (prompts.py tokenizes once for both); a refiner only `clip_g`.

Matching follows A1111, not diffusers: the name is found as a word (`AddedToken(single_word=True)`),
case-insensitively (CLIP lowercases; the token is `normalized`), so `neg` is not found inside
`negative` or `neg_v2` (diffusers' tokens match as substrings). A1111 matches the name's CLIP
tokens, which for a name of letters and digits is the same thing.

A multi-vector embedding takes n positions (counted against the 75-token chunk, as in A1111): its
tokens are `name_0` .. `name_{n-1}`, and a `Replace` step added to the tokenizer's normalizer
rewrites the word `name` into them (diffusers rewrites the prompt in Python instead, into `name
name_1 ..`: that cannot be done through the tokenizer, whose normalizer would rewrite a `name`
token's own text too). One difference from A1111 remains, in prompts.py's chunking: A1111 moves an
embedding that would straddle a 75-token boundary whole into the next chunk; here it is split
(worker/prompt_chunks.py chunks token ids; an embedding's are the ids past the base vocabulary).

A name the tokenizer already holds, in any case (one of its own vocabulary entries), is skipped
with a warning, as diffusers refuses it: its row is the model's own. A1111, which swaps vectors in
after tokenizing instead of adding tokens, would take it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from tokenizers import AddedToken, Regex, normalizers

from shared.errors import ModelLoadError
from worker.embedding_files import Embedding, read_embedding, read_embeddings
from worker.models import LoadedModel

__all__ = [
    "Embedding",
    "install_embeddings",
    "read_embedding",
    "read_embeddings",
    "ti_hashes_param",
    "used_embeddings",
]

log = logging.getLogger(__name__)

# (tokenizer, text encoder, which of the embedding's tensors it takes)
Target = tuple[Any, Any, str]


def install_embeddings(model: LoadedModel, embeddings: Sequence[Embedding]) -> list[str]:
    """Add the embeddings that fit `model`'s text encoders; returns the names installed.

    One that does not fit (another family's width, an SD 1.x file for SDXL, a name the tokenizer
    already holds) is skipped with a warning naming its file and why. `model.embeddings` records
    each installed name with its short hash, for `TI hashes`.
    """
    targets = _targets(model)
    # Lowercased: the tokenizer matches added tokens after lowercasing the prompt.
    taken = {token.lower() for token in model.tokenizer.get_vocab()}
    chosen: list[tuple[Embedding, list[torch.Tensor]]] = []
    for embedding in embeddings:
        why = _misfit(embedding, targets, taken)
        if why is not None:
            log.warning("model %s: embedding %s skipped: %s", model.name, embedding.path, why)
            continue
        taken.update(token.lower() for token in _tokens(embedding))
        chosen.append((embedding, [_vectors_for(embedding, key) for _, _, key in targets]))
    if not chosen:
        return []
    tokens = [token for embedding, _ in chosen for token in _tokens(embedding)]
    ids = _add_tokens(model, targets, tokens)
    for column, (_, encoder, _) in enumerate(targets):
        rows = torch.cat([vectors[column] for _, vectors in chosen])
        _write_rows(encoder, ids, rows)
    multi = [embedding for embedding, _ in chosen if embedding.count > 1]
    for tokenizer in _distinct(t for t, _, _ in targets):
        _expand_multi_vector(tokenizer, multi)
    for embedding, _ in chosen:
        _check_tokenized(model, embedding)
        model.embeddings[embedding.name] = embedding.short_hash
    names = [embedding.name for embedding, _ in chosen]
    log.info("model %s: %d embedding(s) installed: %s", model.name, len(names), ", ".join(names))
    return names


def used_embeddings(model: LoadedModel, texts: Iterable[str]) -> dict[str, str]:
    """The installed embeddings that `texts` (a job's prompt and negative prompt) name, each with
    its short hash, in order of first appearance.

    Found with the tokenizer's rule (the name as a word, any case) on the text rather than by
    tokenizing: this runs on the upload thread, while the render thread may be using the tokenizer.
    """
    found: list[tuple[int, str]] = []
    joined = "\n".join(texts).lower()
    for name in model.embeddings:
        match = re.search(_word_pattern(name), joined)
        if match is not None:
            found.append((match.start(), name))
    return {name: model.embeddings[name] for _, name in sorted(found)}


def ti_hashes_param(used: dict[str, str]) -> list[tuple[str, str]]:
    """A1111's `TI hashes: "name: hash, ..."` setting for the infotext, or none if none was used.

    As in A1111, `:` and `,` are dropped from names and the value is quoted as JSON."""
    if not used:
        return []
    pairs = ", ".join(
        f"{name.replace(':', '').replace(',', '')}: {short}" for name, short in used.items()
    )
    return [("TI hashes", json.dumps(pairs, ensure_ascii=False))]


def _targets(model: LoadedModel) -> list[Target]:
    """(tokenizer, text encoder, which vectors) for each text encoder the model has."""
    if model.text_encoder_2 is None or model.tokenizer_2 is None:
        return [(model.tokenizer, model.text_encoder, "vectors")]
    targets: list[Target] = []
    if model.text_encoder is not None:  # not an SDXL refiner's
        targets.append((model.tokenizer, model.text_encoder, "clip_l"))
    targets.append((model.tokenizer_2, model.text_encoder_2, "clip_g"))
    return targets


def _vectors_for(embedding: Embedding, key: str) -> torch.Tensor:
    vectors: torch.Tensor | None = getattr(embedding, key)
    assert vectors is not None
    return vectors


def _misfit(embedding: Embedding, targets: list[Target], taken: set[str]) -> str | None:
    """Why the embedding cannot go into these encoders, or None if it fits."""
    for _, encoder, key in targets:
        width = int(encoder.get_input_embeddings().weight.shape[1])
        vectors: torch.Tensor | None = getattr(embedding, key)
        if vectors is None:
            wants = "one tensor" if key == "vectors" else "clip_l and clip_g tensors"
            return f"it is {embedding.describe()}; this model's text encoders need {wants}"
        if vectors.shape[1] != width:
            return (
                f"it is {embedding.describe()}; this model's {key} needs width {width} "
                "(an embedding for another model family)"
            )
    clash = [token for token in _tokens(embedding) if token.lower() in taken]
    if clash:
        return f"the tokenizer already holds {clash[0].lower()!r} (in any case); rename the file"
    return None


def _tokens(embedding: Embedding) -> list[str]:
    if embedding.count == 1:
        return [embedding.name]
    return [f"{embedding.name}_{i}" for i in range(embedding.count)]


def _add_tokens(model: LoadedModel, targets: list[Target], tokens: list[str]) -> list[int]:
    """Add the tokens to each tokenizer; their ids, the same in all (prompts.py tokenizes once)."""
    ids: list[int] | None = None
    for tokenizer in _distinct(t for t, _, _ in targets):
        tokenizer.add_tokens([AddedToken(token, single_word=True) for token in tokens])
        got = [int(i) for i in tokenizer.convert_tokens_to_ids(tokens)]
        if ids is not None and got != ids:
            raise ModelLoadError(
                f"model {model.name!r}: its two tokenizers gave embeddings different ids "
                f"({got[0]} and {ids[0]}); they must hold the same vocabulary"
            )
        ids = got
    assert ids is not None
    return ids


def _write_rows(encoder: Any, ids: list[int], rows: torch.Tensor) -> None:
    """Grow the encoder's token embeddings to hold `ids`, and write the vectors there."""
    needed = max(ids) + 1
    if encoder.get_input_embeddings().weight.shape[0] < needed:
        # The new rows are all overwritten below: no need for transformers' mean initialisation.
        encoder.resize_token_embeddings(needed, mean_resizing=False)
        encoder.requires_grad_(False)
    weight = encoder.get_input_embeddings().weight
    weight.data[torch.tensor(ids, device=weight.device)] = rows.to(weight.device, weight.dtype)


def _expand_multi_vector(tokenizer: Any, embeddings: list[Embedding]) -> None:
    """After lowercasing, rewrite each multi-vector name into its n tokens' text."""
    if not embeddings:
        return
    backend = tokenizer.backend_tokenizer
    steps = [backend.normalizer] if backend.normalizer is not None else []
    for embedding in embeddings:
        replacement = " ".join(token.lower() for token in _tokens(embedding))
        steps.append(normalizers.Replace(Regex(_word_pattern(embedding.name)), replacement))
    backend.normalizer = normalizers.Sequence(steps)


def _word_pattern(name: str) -> str:
    """The name as a word of lowercased text: not inside a longer run of letters, digits or `_`."""
    return rf"(?<!\w){re.escape(name.lower())}(?!\w)"


def _check_tokenized(model: LoadedModel, embedding: Embedding) -> None:
    """The name must tokenize to exactly the embedding's tokens (a guard on the rules above)."""
    expected = model.tokenizer.convert_tokens_to_ids(_tokens(embedding))
    got = model.tokenizer(embedding.name, add_special_tokens=False).input_ids
    if got != expected:
        raise ModelLoadError(
            f"model {model.name!r}: embedding {embedding.name!r} ({embedding.path}) tokenizes to "
            f"{got}, not to its tokens {expected}; rename the file"
        )


def _distinct(tokenizers: Iterable[Any]) -> list[Any]:
    """Each tokenizer once (a refiner's `tokenizer` is its `tokenizer_2`)."""
    out: list[Any] = []
    for tokenizer in tokenizers:
        if all(tokenizer is not seen for seen in out):
            out.append(tokenizer)
    return out
