"""From A1111's `parameters` text (an image's infotext) back to the job it describes.

The text is A1111's: the prompt (one or more lines, `<lora:NAME:W>` tags kept in it), a
`Negative prompt:` line when there is one (it may run on over lines too), and a last line of
`Key: value` settings, comma separated, a value holding commas quoted as JSON
(`Lora hashes: "a: 1f2e, b: 9a8b"`), as A1111's `parse_generation_parameters` reads it.

Each setting maps to a job field, or is taken as information, or is refused by name: a field the
farm cannot render as A1111 did (hires fix, face restoration, variation seeds, an init image it
does not carry, noise drawn on the GPU...) is never dropped silently. `RNG` absent means A1111's
default, GPU noise: such a job is accepted, but its pixels are sdfarm's (CPU noise), not the
original's; an image the farm made re-renders the same pixels from its own infotext.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from shared.errors import InvalidJob
from shared.prompt_tags import strip_lora_tags
from shared.samplers import SAMPLERS

__all__ = ["INFORMATIONAL", "job_from_infotext", "split_infotext"]

# A1111's own pattern for one `Key: value` of the settings line.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_HASHED = re.compile(r"^(?P<name>.*?)\s*\[(?P<hash>[0-9a-fA-F]{8,64})\]$")  # `name [hash]`
_TRAILING_LORAS = re.compile(r"(?: <lora:[^:<>]+(?::[^:<>]*)?>)+$")
_NEGATIVE = "Negative prompt:"
_LABELS = {s.label: s.id for s in SAMPLERS}
_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")
# Taken as information: they describe files or the program, not how to render.
INFORMATIONAL = frozenset({"Model hash", "VAE hash", "Lora hashes", "TI hashes", "Version"})
# Settings A1111 writes that cannot be honoured, and why (every other unknown key is refused too).
_WHY_NOT = {
    "Denoising strength": "an infotext carries no init image; submit img2img jobs with "
    "`init_image` and `strength`",
    "RNG": "only `RNG: CPU` noise can be reproduced here; A1111's GPU and NV noise cannot",
}


def split_infotext(text: str) -> tuple[str, str, list[tuple[str, str]]]:
    """The prompt, the negative prompt and the settings (key, value) pairs, in order."""
    lines = text.replace("\r\n", "\n").split("\n")
    settings: list[tuple[str, str]] = []
    if lines and len(_PARAM.findall(lines[-1])) >= 3:  # A1111's test for the settings line
        settings = [(key.strip(), _unquote(value)) for key, value in _PARAM.findall(lines.pop())]
    prompt: list[str] = []
    negative: list[str] | None = None
    for line in lines:
        if negative is None and line.startswith(_NEGATIVE):
            negative = [line.removeprefix(_NEGATIVE).removeprefix(" ")]
        elif negative is not None:
            negative.append(line)
        else:
            prompt.append(line)
    return "\n".join(prompt), "\n".join(negative or []), settings


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) > 1 and value[0] == value[-1] == '"':
        try:
            return str(json.loads(value))
        except json.JSONDecodeError:
            return value
    return value


def _refuse(key: str, message: str) -> InvalidJob:
    return InvalidJob(f"field `{key}`: {message}", [{"field": key, "message": message}])


def _number(key: str, value: str, kind: Callable[[str], Any]) -> Any:
    try:
        return kind(value)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise _refuse(key, f"must be {what}, got {value[:60]!r}") from None


def _sampler(label: str, schedule: str | None) -> str:
    """Our sampler id for A1111's label (and newer A1111's separate `Schedule type`)."""
    if schedule is not None and schedule not in ("Automatic", "Karras"):
        raise _refuse("Schedule type", f"{schedule!r} is not supported; Automatic or Karras are")
    full = f"{label} Karras" if schedule == "Karras" and not label.endswith("Karras") else label
    if full not in _LABELS:
        known = ", ".join(_LABELS)
        raise _refuse("Sampler", f"{full!r} is not supported; supported: {known}")
    return _LABELS[full]


def _model(name: str | None, short: str | None, by_hash: Mapping[str, str], key: str) -> str | None:
    """The farm's model for an infotext's name and hash: the hash wins where a worker serves it;
    a name whose served model has another hash is refused (it is another model)."""
    if short is not None and short.lower() in by_hash:
        return by_hash[short.lower()]
    if name is None:
        if short is not None:
            raise _refuse(f"{key} hash", f"no model of this farm has hash {short!r}")
        return None
    hashes = {model: digest for digest, model in by_hash.items()}
    if short is not None and name in hashes:
        raise _refuse(
            f"{key} hash",
            f"{short!r} is not the hash of this farm's model {name!r} ({hashes[name]})",
        )
    return name


def job_from_infotext(text: str, model_hashes: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The job fields an infotext describes; InvalidJob naming the field it cannot honour.

    `model_hashes` maps A1111 short hashes (10 hex digits) to the farm's model names, from the
    workers' heartbeats, so that `Model hash` finds a model whose name differs from A1111's.
    The job is validated afterwards like any other (the model's name, the sizes, the LoRAs).
    """
    by_hash = {digest.lower(): name for digest, name in (model_hashes or {}).items()}
    prompt, negative, pairs = split_infotext(text)
    if not pairs:
        raise _refuse("parameters", "no settings line (`Steps: ..., Sampler: ..., ...`) found")
    values = dict(pairs)
    twice = sorted({key for key, _ in pairs if [k for k, _ in pairs].count(key) > 1})
    if twice:
        raise _refuse(twice[0], "is given more than once")
    job: dict[str, Any] = {"prompt": prompt, **_trailing_loras(prompt)}
    if negative:
        job["negative_prompt"] = negative
    handled = {"Sampler", "Schedule type", "Model", "Refiner"} | INFORMATIONAL
    # Keys refused outright first: hires fix's `Denoising strength` is about hires fix.
    for key, value in sorted(pairs, key=lambda pair: pair[0] in _WHY_NOT):
        if key in handled:
            continue
        if key == "RNG" and value == "CPU":
            continue
        if key in _WHY_NOT:
            raise _refuse(key, f"{value[:60]!r} is not supported: {_WHY_NOT[key]}")
        field = _FIELDS.get(key)
        if field is None:
            raise _refuse(key, "is not supported by sdfarm, so the image cannot be reproduced")
        job.update(field(key, value))
    if "Sampler" in values:
        job["scheduler"] = _sampler(values["Sampler"], values.get("Schedule type"))
    elif "Schedule type" in values:
        raise _refuse("Schedule type", "given without a Sampler")
    model = _model(values.get("Model"), values.get("Model hash"), by_hash, "Model")
    if model is not None:
        job["model"] = model
    if "Refiner" in values:
        hashed = _HASHED.match(values["Refiner"])
        name, short = (hashed["name"], hashed["hash"]) if hashed else (values["Refiner"], None)
        job["refiner"] = _model(name, short, by_hash, "Refiner")
    return job


def _trailing_loras(prompt: str) -> dict[str, Any]:
    """The `<lora:...>` tags at the prompt's end (where the farm writes a job's `loras`) taken
    off exactly, so the prompt keeps its line breaks; tags elsewhere are JobSpec's to move."""
    tail = _TRAILING_LORAS.search(prompt)
    if tail is None or not prompt[: tail.start()].strip():
        return {}
    try:
        _, loras = strip_lora_tags(tail.group(0))
    except ValueError as e:
        raise _refuse("prompt", str(e)) from None
    return {"prompt": prompt[: tail.start()], "loras": loras}


def _size(key: str, value: str) -> dict[str, Any]:
    match = _SIZE.match(value)
    if not match:
        raise _refuse(key, f"must look like 512x768 (width x height), got {value[:60]!r}")
    return {"width": int(match[1]), "height": int(match[2])}


def _vae(key: str, value: str) -> dict[str, Any]:
    """A1111 writes the VAE's file name; the farm's VAEs are named by it without the suffix."""
    name = value
    for suffix in _FILE_SUFFIXES:
        name = name.removesuffix(suffix)
    return {"vae": name}


def _clip_skip(key: str, value: str) -> dict[str, Any]:
    skip = _number(key, value, int)
    return {} if skip == 1 else {"clip_skip": skip}  # 1 is CLIP's last layer: the default


def _choice(name: str, allowed: tuple[str, ...]) -> Callable[[str, str], dict[str, Any]]:
    """sdfarm's own keys (`Long prompt`, `Prompt syntax`): one of a few words."""

    def read(key: str, value: str) -> dict[str, Any]:
        if value not in allowed:
            raise _refuse(key, f"{value!r} is not one of {', '.join(allowed)}")
        return {name: value}

    return read


def _field(name: str, kind: Callable[[str], Any]) -> Callable[[str, str], dict[str, Any]]:
    def read(key: str, value: str) -> dict[str, Any]:
        return {name: _number(key, value, kind)}

    return read


_FIELDS: dict[str, Callable[[str, str], dict[str, Any]]] = {
    "Steps": _field("steps", int),
    "CFG scale": _field("guidance", float),
    "Seed": _field("seed", int),
    "Size": _size,
    "Clip skip": _clip_skip,
    "VAE": _vae,
    "Refiner switch at": _field("refiner_switch_at", float),
    "Long prompt": _choice("long_prompt", ("truncate", "chunk")),
    "Prompt syntax": _choice("prompt_syntax", ("a1111", "plain")),
}
