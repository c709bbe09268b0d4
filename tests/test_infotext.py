"""An A1111 infotext (`parameters`) read back as the job it describes (shared/infotext.py), and
the infotext the farm writes (shared/metadata.py) read back as the job that made it.

A setting sdfarm cannot honour is refused by name, never dropped; the farm's own infotexts give
back every field they carry.
"""

from __future__ import annotations

from typing import Any

import pytest

from shared.batches import BatchCreate
from shared.errors import InvalidJob
from shared.infotext import job_from_infotext, split_infotext
from shared.jobs import JobSpec
from shared.metadata import infotext

HASHES = {"0123456789": "farm-sd"}  # A1111 short hash -> the farm's model, from heartbeats

# (A1111 infotext, the job fields it describes)
TABLE: list[tuple[str, dict[str, Any]]] = [
    (
        "a lighthouse at dusk\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x768, Model: farm-sd",
        {
            "prompt": "a lighthouse at dusk",
            "steps": 20,
            "scheduler": "euler_a",
            "guidance": 7.0,
            "seed": 42,
            "width": 512,
            "height": 768,
            "model": "farm-sd",
        },
    ),
    (
        # A prompt and a negative prompt over several lines; the model found by its hash alone
        # (A1111's name for it is another); quoted values holding commas; informational keys
        "a cat, (red scarf:1.2)\nBREAK in the snow\nNegative prompt: blurry\nlow quality\n"
        "Steps: 8, Sampler: DPM++ 2M Karras, CFG scale: 5.5, Seed: 7, Size: 64x64, "
        "Model hash: 0123456789, Model: v1-5-pruned-emaonly, Clip skip: 2, RNG: CPU, "
        'Lora hashes: "film: 1a2b3c4d5e6f, ink: 9f8e7d6c5b4a", TI hashes: "bad: 0a0b", '
        "Version: v1.10.1",
        {
            "prompt": "a cat, (red scarf:1.2)\nBREAK in the snow",
            "negative_prompt": "blurry\nlow quality",
            "steps": 8,
            "scheduler": "dpmpp_2m_karras",
            "guidance": 5.5,
            "seed": 7,
            "width": 64,
            "height": 64,
            "model": "farm-sd",
            "clip_skip": 2,
        },
    ),
    (
        # Newer A1111: the schedule apart from the sampler; a VAE by its file name; LoRA tags
        # at the end become `loras` (elsewhere JobSpec moves them); `Clip skip: 1` is the default
        "a <lora:ink> fox <lora:film:0.8>\n"
        "Steps: 4, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1, "
        "Size: 64x64, Model: farm-sd, VAE hash: 235745af8d, VAE: mse.safetensors, Clip skip: 1",
        {
            "prompt": "a <lora:ink> fox",
            "loras": [{"name": "film", "weight": 0.8}],
            "steps": 4,
            "scheduler": "dpmpp_2m_karras",
            "guidance": 7.5,
            "seed": 1,
            "width": 64,
            "height": 64,
            "model": "farm-sd",
            "vae": "mse",
        },
    ),
    (
        # An SDXL refiner as A1111 writes it, found by its name (its hash is unknown here)
        "a heron\nSteps: 10, Sampler: Euler, CFG scale: 6, Seed: 3, Size: 1024x1024, "
        "Model: xl, Refiner: ref [abcdef1234], Refiner switch at: 0.7, Schedule type: Automatic",
        {
            "prompt": "a heron",
            "steps": 10,
            "scheduler": "euler",
            "guidance": 6.0,
            "seed": 3,
            "width": 1024,
            "height": 1024,
            "model": "xl",
            "refiner": "ref",
            "refiner_switch_at": 0.7,
        },
    ),
]


@pytest.mark.parametrize(("text", "expected"), TABLE)
def test_an_a1111_infotext_reads_as_the_job_it_describes(
    text: str, expected: dict[str, Any]
) -> None:
    # Given an infotext as A1111 writes it
    # When it is read
    job = job_from_infotext(text, HASHES)
    # Then it is the job it describes
    assert job == expected


def test_a_quoted_value_keeps_its_commas_and_escapes() -> None:
    # Given a settings line whose values are quoted as A1111 quotes them
    text = 'x\nSteps: 1, Seed: 2, Lora hashes: "a: 1, b: 2", Note: "say \\"hi\\", ok", Size: 64x64'
    # When it is split
    _, _, settings = split_infotext(text)
    # Then each quoted value is one value, unquoted
    assert dict(settings) == {
        "Steps": "1",
        "Seed": "2",
        "Lora hashes": "a: 1, b: 2",
        "Note": 'say "hi", ok',
        "Size": "64x64",
    }


BASE = "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512, Model: farm-sd"


@pytest.mark.parametrize(
    ("extra", "field", "says"),
    [
        ("Hires upscale: 2, Hires upscaler: Latent, Denoising strength: 0.7", "Hires upscale", ""),
        ('ADetailer model: "face_yolov8n.pt"', "ADetailer model", "not supported"),
        ("Face restoration: CodeFormer", "Face restoration", "not supported"),
        ("Variation seed: 5, Variation seed strength: 0.3", "Variation seed", "not supported"),
        ("ENSD: 31337", "ENSD", "not supported"),
        ("Eta noise seed delta: 31337", "Eta noise seed delta", "not supported"),
        ("Denoising strength: 0.5", "Denoising strength", "no init image"),
        ("RNG: GPU", "RNG", "GPU"),
        ("RNG: NV", "RNG", "NV"),
        ("Schedule type: Exponential", "Schedule type", "Exponential"),
        ("Seed: x", "Seed", "given more than once"),
    ],
)
def test_a_setting_sdfarm_cannot_honour_is_refused_by_name(
    extra: str, field: str, says: str
) -> None:
    # Given an infotext with a setting the farm does not render
    text = f"{BASE}, {extra}"
    # When it is read
    with pytest.raises(InvalidJob) as refused:
        job_from_infotext(text, HASHES)
    # Then the refusal names the field, never drops it
    assert refused.value.details[0]["field"] == field
    assert f"`{field}`" in str(refused.value) and says in str(refused.value)


@pytest.mark.parametrize(
    ("text", "field", "says"),
    [
        ("a cat\nSteps: ten, Seed: 1, Size: 64x64", "Steps", "whole number"),
        ("a cat\nSteps: 1, Seed: 1, Size: big", "Size", "512x768"),
        ("a cat\nSteps: 1, Seed: 1, Size: 64x64, Sampler: Restart", "Sampler", "Restart"),
        ("a cat\nSteps: 1, Seed: 1, Size: 64x64, Model hash: ffffffffff", "Model hash", "no model"),
        (
            "a cat\nSteps: 1, Seed: 1, Size: 64x64, Model hash: eeeeeeeeee, Model: farm-sd",
            "Model hash",
            "not the hash",
        ),
        ("just a prompt", "parameters", "no settings line"),
    ],
)
def test_a_malformed_or_unknown_value_is_refused_naming_its_field(
    text: str, field: str, says: str
) -> None:
    with pytest.raises(InvalidJob) as refused:
        job_from_infotext(text, HASHES)
    assert refused.value.details[0]["field"] == field and says in str(refused.value)


# A job with every field the farm's infotext carries set away from its default.
EVERY_FIELD = {
    "prompt": "a (red:1.3) fox\nBREAK in snow",
    "negative_prompt": "blurry, lowres",
    "model": "tiny",
    "scheduler": "dpmpp_2m_karras",
    "steps": 13,
    "guidance": 6.25,
    "width": 72,
    "height": 64,
    "seed": 4_000_000_001,
    "loras": [{"name": "film", "weight": 0.65}, {"name": "ink", "weight": -1.0}],
    "clip_skip": 2,
    "vae": "mse",
}


@pytest.mark.parametrize("sampler", ["lms", "euler_a", "dpmpp_2m_karras", "pndm", "dpmpp_sde"])
def test_the_farms_infotext_reads_back_as_the_job_that_made_it(sampler: str) -> None:
    # Given a job with every field the farm writes, and the infotext of its image
    spec = JobSpec.model_validate({**EVERY_FIELD, "scheduler": sampler})
    text = infotext(
        spec.model_dump(),
        model_name="tiny",
        model_hash="0123456789",
        vae_hash="aaaaaaaaaa",
        extra=[("Lora hashes", '"film: 1a2b3c4d5e6f, ink: 9f8e7d6c5b4a"')],
        rng="CPU",
    )
    # When the infotext is read back into a job
    again = JobSpec.model_validate(job_from_infotext(text, {"0123456789": "tiny"}))
    # Then it is the same job
    assert again == spec


def test_a_refined_job_reads_back_with_its_refiner() -> None:
    spec = JobSpec.model_validate(
        {"prompt": "a heron", "model": "xl", "seed": 1, "refiner": "ref", "refiner_switch_at": 0.7}
    )
    text = infotext(spec.model_dump(), model_name="xl", refiner_hash="abcdef1234")
    assert JobSpec.model_validate(job_from_infotext(text)) == spec


def test_a_batch_of_infotexts_names_the_job_and_the_field_it_refuses() -> None:
    # Given a batch of two infotexts, the second with hires fix, and defaults for both
    create = BatchCreate(a1111=[BASE, f"{BASE}, Hires upscale: 2"], defaults={"steps": 2})
    # When its jobs are read
    with pytest.raises(InvalidJob) as refused:
        create.job_dicts(HASHES)
    # Then the refusal names job 1 and its field
    assert refused.value.details == [
        {
            "job": 1,
            "field": "Hires upscale",
            "message": "is not supported by sdfarm, so the image cannot be reproduced",
        }
    ]
    assert str(refused.value).startswith("job 1 (a1111[1]), field `Hires upscale`")
    # And without it the infotext's own values win over the defaults
    assert BatchCreate(a1111=[BASE], defaults={"steps": 2}).job_dicts()[0]["steps"] == 20


def test_a_batch_gives_exactly_one_form_of_jobs() -> None:
    with pytest.raises(InvalidJob, match="`a1111`"):
        BatchCreate(a1111=[BASE], prompts=["a cat"]).job_dicts()


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"long_prompt": "chunk"}, "Long prompt: chunk"),
        ({"prompt_syntax": "plain"}, "Prompt syntax: plain"),
    ],
)
def test_a_job_off_the_defaults_says_so_and_reads_back_the_same(
    fields: dict[str, str], key: str
) -> None:
    spec = JobSpec.model_validate({"prompt": "a (long) fox", "model": "tiny", "seed": 3, **fields})
    text = infotext(spec.model_dump(), model_name="tiny")
    assert key in text.splitlines()[-1]
    assert JobSpec.model_validate(job_from_infotext(text)) == spec
    plain = infotext(
        JobSpec.model_validate({"prompt": "x", "seed": 3}).model_dump(), model_name="t"
    )
    assert "Long prompt" not in plain and "Prompt syntax" not in plain


def test_an_unknown_value_of_an_sdfarm_key_is_refused_by_name() -> None:
    with pytest.raises(InvalidJob, match=r"Long prompt.*'all' is not one of truncate, chunk"):
        job_from_infotext(f"{BASE}, Long prompt: all")
