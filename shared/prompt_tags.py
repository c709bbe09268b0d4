"""A1111's extra-network tags in a prompt: `<lora:NAME>` and `<lora:NAME:WEIGHT>`.

A1111 reads these out of the prompt before CLIP sees it; so does sdfarm, at submit, where a tag
becomes an entry of the job's `loras` (the same as the field would give), and the prompt keeps
its other text. Tags of networks sdfarm does not render (`<hypernet:...>`, `<lyco:...>`, any other
`<kind:...>`) are refused by name rather than sent to CLIP as words. The negative prompt's tags
are refused too: A1111 applies LoRAs from the prompt only.
"""

from __future__ import annotations

import re
from typing import Any

from shared.a1111_syntax import PromptSyntaxError, parse_prompt

__all__ = ["LORA_TAG", "lora_tags_to_field", "strip_lora_tags"]

# <kind:name> or <kind:name:weight>; the name has no ':' or '>'.
_TAG = re.compile(r"<(?P<kind>[A-Za-z_]+):(?P<name>[^:<>]+)(?::(?P<weight>[^:<>]*))?>")
LORA_TAG = "lora"


def strip_lora_tags(prompt: str) -> tuple[str, list[dict[str, Any]]]:
    """The prompt without its `<lora:...>` tags, and the LoRAs they name, in order.

    Raises ValueError for a tag of another kind, or a weight that is not a number.
    """
    loras: list[dict[str, Any]] = []

    def take(match: re.Match[str]) -> str:
        kind, name, weight = match["kind"], match["name"].strip(), match["weight"]
        if kind.lower() != LORA_TAG:
            raise ValueError(f"<{kind}:...> tags are not supported; only <lora:NAME:WEIGHT> is")
        try:
            value = 1.0 if weight is None or not weight.strip() else float(weight)
        except ValueError:
            raise ValueError(f"<lora:{name}:{weight}>: the weight must be a number") from None
        loras.append({"name": name, "weight": value})
        return ""

    text = _TAG.sub(take, prompt)
    return (" ".join(text.split()) if loras else text), loras


def lora_tags_to_field(data: dict[str, Any]) -> dict[str, Any]:
    """A job's fields with its prompt's LoRA tags moved into `loras` (after any it names).

    The prompts are read with A1111's syntax here too, so a prompt the worker could not read,
    `(cat:1.2.3)`, is refused at submit instead of failing its job on a GPU."""
    prompt, negative = data.get("prompt"), data.get("negative_prompt")
    for what, text in (("prompt", prompt), ("negative prompt", negative)):
        if isinstance(text, str):
            try:
                parse_prompt(text)
            except PromptSyntaxError as e:
                hint = 'escape brackets as \\( \\) or send prompt_syntax "plain"'
                raise ValueError(f"the {what} does not read as A1111 syntax: {e}; {hint}") from e
    if isinstance(negative, str) and _TAG.search(negative):
        raise ValueError("the negative prompt may not hold <lora:...> tags; A1111 reads them "
                         "from the prompt only")  # fmt: skip
    if not isinstance(prompt, str) or "<" not in prompt:
        return data
    text, tagged = strip_lora_tags(prompt)
    if not tagged:
        return data
    given = data.get("loras") or []
    return {**data, "prompt": text, "loras": [*given, *tagged]}
