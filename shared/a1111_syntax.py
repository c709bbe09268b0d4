"""A1111's prompt syntax, read into (text, weight) pieces and chunk breaks. Pure Python.

The rules are A1111's (`modules/prompt_parser.py`, `parse_prompt_attention`, as its wiki and
docstring describe them):

    (text)          weight x 1.1            [text]          weight / 1.1
    (text:1.3)      weight x 1.3            nesting         the factors multiply
    \\( \\) \\[ \\]     the bracket itself      \\\\              a backslash
    BREAK           (uppercase, a word of its own) the next text starts a new 75-token chunk

An unclosed `(` or `[` applies to the end of the prompt, a `)` or `]` with nothing open is kept
as text, a lone backslash is dropped, and neighbouring pieces of equal weight are merged (A1111
tokenizes each piece on its own, so merging decides where words may join).

Where this differs from A1111: `BREAK` inside brackets still breaks (A1111 multiplies its marker's
weight and then reads "BREAK" as a word with a negative weight), and a weight that is not a number,
`(text:1.2.3)`, raises PromptSyntaxError (A1111 fails the whole generation with a ValueError).
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["BREAK", "Break", "Piece", "PromptSyntaxError", "parse_prompt"]

ROUND_FACTOR = 1.1  # what `(text)` multiplies by
SQUARE_FACTOR = 1 / 1.1  # what `[text]` multiplies by

# A1111's tokens, in its order: escapes, brackets, a weight closing a round bracket, text, ":".
_TOKENS = re.compile(
    r"""
    \\\( | \\\) | \\\[ | \\] | \\\\ | \\ |
    \( | \[ |
    :\s*([+-]?[.\d]+)\s*\) |
    \) | ] |
    [^\\()\[\]:]+ |
    :
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


class Break:
    """A chunk boundary: the text after it starts a new 75-token chunk."""

    def __repr__(self) -> str:
        return "BREAK"


BREAK: Final = Break()
Piece = tuple[str, float]  # text and the weight of its tokens


class PromptSyntaxError(ValueError):
    """A prompt A1111's syntax cannot read; the message quotes the part to fix."""


def parse_prompt(text: str) -> list[Piece | Break]:
    """The prompt's pieces, in order, with BREAK between chunks; `[("", 1.0)]` for ""."""
    # Mutable [text, weight] pairs while brackets are open: closing one multiplies its range.
    out: list[list[str | float] | Break] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for item in out[start:]:
            if not isinstance(item, Break):
                item[1] = float(item[1]) * factor

    for match in _TOKENS.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            out.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(out))
        elif token == "[":
            square_open.append(len(out))
        elif weight is not None and round_open:
            multiply(round_open.pop(), _number(weight, match.start()))
        elif token == ")" and round_open:
            multiply(round_open.pop(), ROUND_FACTOR)
        elif token == "]" and square_open:
            multiply(square_open.pop(), SQUARE_FACTOR)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i > 0:
                    out.append(BREAK)
                out.append([part, 1.0])
    for start in round_open:
        multiply(start, ROUND_FACTOR)
    for start in square_open:
        multiply(start, SQUARE_FACTOR)
    return _merged(out) or [("", 1.0)]


def _number(weight: str, at: int) -> float:
    try:
        return float(weight)
    except ValueError as e:
        raise PromptSyntaxError(
            f"the weight {weight!r} at character {at} is not a number: write it as "
            f"`(text:1.3)`, or escape the bracket as `\\)` to keep it as text"
        ) from e


def _merged(items: list[list[str | float] | Break]) -> list[Piece | Break]:
    """Neighbouring pieces of equal weight joined, as A1111 joins them."""
    out: list[Piece | Break] = []
    for item in items:
        if isinstance(item, Break):
            out.append(item)
            continue
        text, weight = str(item[0]), float(item[1])
        last = out[-1] if out else None
        if isinstance(last, tuple) and last[1] == weight:
            out[-1] = (last[0] + text, weight)
        else:
            out.append((text, weight))
    return out
