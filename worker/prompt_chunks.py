"""A prompt's text to 75-token chunks, each token with its weight: plain, or as A1111 splits.

Plain text (`prompt_syntax="plain"`) is tokenized whole and cut every 75 tokens, each token of
weight 1. A1111's syntax (shared/a1111_syntax.py) is tokenized a piece at a time, each token
carrying its piece's weight, and chunked as A1111's `FrozenCLIPEmbedderWithCustomWords.
tokenize_line` does: a chunk fills up to 75 tokens; when it is full and the next token is not a
comma, the tokens after the chunk's last comma move to the next chunk, if that comma is within
the last COMMA_BACKTRACK tokens (A1111's `comma_padding_backtrack`), so that a phrase is not cut
in two; BREAK ends a chunk where it stands (one at the very start gives an empty first chunk, one
at the end none). With `long_prompt="truncate"` only the first chunk is kept and a warning names
the words dropped; with "chunk" every chunk is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.a1111_syntax import Break, parse_prompt

__all__ = ["CHUNK_TOKENS", "COMMA_BACKTRACK", "Chunk", "text_chunks"]

CHUNK_TOKENS = 75  # prompt tokens CLIP reads between its start and end tokens
COMMA_BACKTRACK = 20  # A1111's default `comma_padding_backtrack`; 0 would never move words


@dataclass
class Chunk:
    """Up to 75 token ids, a weight each, and what ended the chunk: "full" (75 tokens),
    "comma" (full, its tail moved on to the next chunk), "break" (BREAK) or "end"."""

    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    ended_by: str = "end"

    @property
    def plain(self) -> bool:
        """Whether every token has weight 1, so the states need no emphasis."""
        return all(weight == 1.0 for weight in self.weights)


def text_chunks(
    tokenizer: Any, what: str, text: str, long_prompt: str, syntax: str
) -> tuple[list[Chunk], list[str]]:
    """The chunks CLIP reads for `text` (`what`: "prompt" or "negative prompt"), and a warning
    naming the words dropped when `long_prompt` is "truncate" and the text is longer."""
    if syntax == "plain":
        ids: list[int] = tokenizer(text, add_special_tokens=False).input_ids
        chunks = [
            Chunk(ids[i : i + CHUNK_TOKENS], [1.0] * len(ids[i : i + CHUNK_TOKENS]), "full")
            for i in range(0, len(ids), CHUNK_TOKENS)
        ] or [Chunk()]
    elif syntax == "a1111":
        chunks = a1111_chunks(tokenizer, text)
    else:
        raise ValueError(f"`prompt_syntax` has to be 'a1111' or 'plain' but is {syntax!r}")
    if long_prompt == "chunk":
        return chunks, []
    dropped = [token for chunk in chunks[1:] for token in chunk.ids]
    if not dropped:
        return chunks[:1], []
    return chunks[:1], [_dropped_warning(tokenizer, what, chunks, dropped)]


def a1111_chunks(tokenizer: Any, text: str, backtrack: int = COMMA_BACKTRACK) -> list[Chunk]:
    """`text` in A1111's syntax, chunked as A1111 chunks it (see the module's docstring)."""
    pieces = parse_prompt(text)
    texts = [piece[0] for piece in pieces if not isinstance(piece, Break)]
    piece_ids = iter(tokenizer(texts, add_special_tokens=False).input_ids)
    comma = _comma_id(tokenizer)
    chunks: list[Chunk] = []
    chunk = Chunk()
    last_comma = -1  # where in `chunk` its last comma is, -1 when it has none

    def seal(ended_by: str) -> None:
        nonlocal chunk, last_comma
        chunk.ended_by = ended_by
        chunks.append(chunk)
        chunk, last_comma = Chunk(), -1

    for piece in pieces:
        if isinstance(piece, Break):
            seal("break")
            continue
        weight = piece[1]
        for token in next(piece_ids):
            if token == comma:
                last_comma = len(chunk.ids)
            elif (
                len(chunk.ids) == CHUNK_TOKENS
                and last_comma != -1
                and CHUNK_TOKENS - last_comma <= backtrack
            ):
                # A full chunk and a comma near its end: what follows the comma moves on.
                cut = last_comma + 1
                moved = Chunk(chunk.ids[cut:], chunk.weights[cut:])
                del chunk.ids[cut:], chunk.weights[cut:]
                seal("comma")
                chunk = moved
            if len(chunk.ids) == CHUNK_TOKENS:
                seal("full")
            chunk.ids.append(token)
            chunk.weights.append(weight)
    if chunk.ids or not chunks:
        seal("end")
    return chunks


def _comma_id(tokenizer: Any) -> int | None:
    ids: list[int] = tokenizer(",", add_special_tokens=False).input_ids
    return ids[0] if len(ids) == 1 else None


def _dropped_warning(tokenizer: Any, what: str, chunks: list[Chunk], dropped: list[int]) -> str:
    first = chunks[0]
    total = len(first.ids) + len(dropped)
    why = {
        "comma": f", and A1111 ends the first chunk at the comma after token {len(first.ids)}",
        "break": f", and BREAK ends the first chunk after token {len(first.ids)}",
    }.get(first.ended_by, "")
    words = tokenizer.decode(dropped).strip()
    return (
        f"{what} is {total} tokens; CLIP reads {CHUNK_TOKENS}{why}, so these words were "
        f"dropped: {words!r} (set long_prompt to 'chunk' to keep them)"
    )
