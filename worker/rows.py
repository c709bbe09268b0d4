"""From a validated job spec to what the sampling loop takes: a Row, and the pass's PassParams.

The farm's chunks (worker/chunk.py) and `sdfarm render` (worker/cli.py) both go through here, so a
job renders with the same settings wherever it runs.
"""

from __future__ import annotations

from shared.errors import SdfarmError
from shared.jobs import JobSpec
from shared.storage import Storage
from worker.init_images import load_init_image, read_init_image_bytes
from worker.sampler import PassParams, Row

__all__ = ["pass_params", "row_for"]


def pass_params(spec: JobSpec) -> PassParams:
    """What a pass of jobs with this spec's compatibility key shares."""
    return PassParams(
        steps=spec.steps,
        width=spec.width,
        height=spec.height,
        scheduler=spec.scheduler,
        strength=spec.denoising_strength if spec.init_image is not None else None,
    )


def row_for(spec: JobSpec, storage: Storage | None = None) -> Row:
    """The job's row, its init image read (from `storage` for s3:// keys) and decoded.

    Raises InvalidJob when the init image is missing or not usable, StorageError when the store
    fails.
    """
    if spec.seed is None:
        raise SdfarmError("job reached a worker without a seed; seeds are fixed at submit")
    init_image = None
    if spec.init_image is not None:
        data = read_init_image_bytes(spec.init_image, storage)
        init_image = load_init_image(data, spec.width, spec.height, resize=spec.resize_init)
    return Row(
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt,
        seed=spec.seed,
        guidance=spec.guidance,
        init_image=init_image,
        long_prompt=spec.long_prompt,
    )
