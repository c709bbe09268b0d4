"""Step 2 of a chunk: from claimed jobs to what the sampling loop takes, a Row each.

The farm's chunks and `sdfarm render` (worker/cli.py) both go through `row_for` and
`pass_params`, so a job renders with the same settings wherever it runs. `build_rows` does it for a
whole chunk, so that a job whose init image cannot be read or used fails (or waits for the store)
on its own while its neighbours render.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shared.errors import InvalidJob, SdfarmError
from shared.init_images import DEFAULT_LIMITS, ImageLimits
from shared.jobs import DEFAULT_AESTHETIC_SCORE, DEFAULT_NEGATIVE_AESTHETIC_SCORE, JobSpec
from shared.storage import Storage
from worker.claim import Claimed
from worker.init_images import load_init_image, read_init_image_bytes
from worker.sampler import PassParams, Row

__all__ = ["RowJob", "Unreadable", "build_rows", "pass_params", "row_for"]


@dataclass(frozen=True)
class RowJob:
    """A claimed job and its row, ready to render."""

    job: Claimed
    row: Row


@dataclass(frozen=True)
class Unreadable:
    """A claimed job whose row could not be built, and why (InvalidJob, or a StorageError)."""

    job: Claimed
    error: SdfarmError


def pass_params(spec: JobSpec) -> PassParams:
    """What a pass of jobs with this spec's compatibility key shares."""
    return PassParams(
        steps=spec.steps,
        width=spec.width,
        height=spec.height,
        scheduler=spec.scheduler,
        strength=spec.denoising_strength if spec.init_image is not None else None,
        refiner_switch_at=spec.switch_at if spec.refiner is not None else None,
        loras=tuple(sorted((lora.name, lora.weight) for lora in spec.loras if lora.weight)),
    )


def row_for(
    spec: JobSpec, storage: Storage | None = None, limits: ImageLimits = DEFAULT_LIMITS
) -> Row:
    """The job's row, its init image read (from `storage` for uploads and s3:// keys) within
    `limits` (the settings' init_image_max_bytes and init_image_max_pixels) and decoded.

    Raises InvalidJob when the init image is missing or not usable, StorageError when the store
    fails.
    """
    if spec.seed is None:
        raise InvalidJob("job reached a worker without a seed; seeds are fixed at submit")
    init_image = None
    if spec.init_image is not None:
        data = read_init_image_bytes(spec.init_image, storage, limits)
        init_image = load_init_image(
            data, spec.width, spec.height, resize=spec.resize_init, limits=limits
        )
    return Row(
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt,
        seed=spec.seed,
        guidance=spec.guidance,
        init_image=init_image,
        long_prompt=spec.long_prompt,
        prompt_syntax=spec.prompt_syntax,
        clip_skip=spec.clip_skip,
        original_size=_original_size(spec),
        crop_top_left=(spec.crop_top, spec.crop_left),
        aesthetic_score=_or(spec.aesthetic_score, DEFAULT_AESTHETIC_SCORE),
        negative_aesthetic_score=_or(
            spec.negative_aesthetic_score, DEFAULT_NEGATIVE_AESTHETIC_SCORE
        ),
    )


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _original_size(spec: JobSpec) -> tuple[int, int] | None:
    """SDXL's original size, (height, width); None (the job's size) when the job gives neither."""
    if spec.original_width is None and spec.original_height is None:
        return None
    return (spec.original_height or spec.height, spec.original_width or spec.width)


def build_rows(
    jobs: Sequence[Claimed], storage: Storage, limits: ImageLimits = DEFAULT_LIMITS
) -> tuple[list[RowJob], list[Unreadable]]:
    """Every job's row; the jobs whose row cannot be built come back apart, with the error."""
    ready, unreadable = [], []
    for job in jobs:
        try:
            ready.append(RowJob(job, row_for(job.spec, storage, limits)))
        except SdfarmError as e:
            unreadable.append(Unreadable(job, e))
        except Exception as e:  # a decoder's own error (a decompression bomb...): this job's
            error = InvalidJob(f"its init image cannot be used: {type(e).__name__}: {e}")
            unreadable.append(Unreadable(job, error))
    return ready, unreadable
