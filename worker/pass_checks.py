"""Before a pass: what the sampling loop refuses; after it: what each row's job should be told."""

from __future__ import annotations

from collections.abc import Sequence

from shared.errors import InvalidJob
from worker.models import LoadedModel
from worker.pass_spec import PassParams, Row

__all__ = ["NATIVE_PIXELS_RANGE", "check_pass", "pass_warnings"]

# A size whose pixel count is within this many times the model's native square gets no warning:
# SD 1.5 at 512x768 or 768x768, SDXL at 832x1216 are common; SDXL at 512x512 is not.
NATIVE_PIXELS_RANGE = (0.5, 4.0)


def check_pass(
    model: LoadedModel, rows: Sequence[Row], params: PassParams, refiner: LoadedModel | None
) -> None:
    """Refuse a pass the loop cannot render: InvalidJob says which field and why."""
    if (refiner is None) != (params.refiner_switch_at is None):
        raise ValueError("a refiner and a switch point come together, or neither")
    if model.family == "sdxl-refiner" or (refiner is not None and model.family != "sdxl"):
        raise InvalidJob(f"{model.name} ({model.family}) cannot start an image a refiner finishes")
    if refiner is not None and refiner.family != "sdxl-refiner":
        raise InvalidJob(f"{refiner.name} is {refiner.family}, not an sdxl-refiner")
    if not rows:
        raise ValueError("render_pass needs at least one row, got none")
    if params.steps < 1:
        raise InvalidJob(f"`steps` has to be at least 1 but is {params.steps}")
    factor = model.vae_scale_factor
    for name, value in (("width", params.width), ("height", params.height)):
        if value <= 0:
            raise InvalidJob(f"`{name}` has to be positive but is {value}")
        if value % factor:
            raise InvalidJob(f"`{name}` has to be divisible by {factor} but is {value}")
    if params.strength is None:
        return
    if not 0 < params.strength <= 1 or int(params.steps * params.strength) < 1:
        raise InvalidJob(
            f"`strength` has to be in (0, 1] with strength x steps >= 1 but is "
            f"{params.strength} with {params.steps} steps"
        )
    wanted = (params.height, params.width, 3)
    for i, row in enumerate(rows):
        if row.init_image is None or row.init_image.shape != wanted:
            shape = None if row.init_image is None else row.init_image.shape
            raise InvalidJob(f"row {i}: `init_image` has to be {wanted} uint8 but is {shape}")


def pass_warnings(model: LoadedModel, rows: Sequence[Row], params: PassParams) -> list[list[str]]:
    """Per row: what its job should know about the pass (a far-from-native size, conditioning
    that this model ignores); the image was rendered as asked all the same."""
    size_note = _far_from_native(model, params)
    return [_ignored_conditioning(model, row) + size_note for row in rows]


def _far_from_native(model: LoadedModel, params: PassParams) -> list[str]:
    """A warning when the size is far from the model's own (rendered as asked, never changed)."""
    ratio = params.width * params.height / model.native_px**2
    if NATIVE_PIXELS_RANGE[0] <= ratio <= NATIVE_PIXELS_RANGE[1]:
        return []
    return [
        f"{params.width}x{params.height} is far from the {model.native_px}x{model.native_px} "
        f"this {model.family} model was trained at; expect broken or repeated composition"
    ]


def _ignored_conditioning(model: LoadedModel, row: Row) -> list[str]:
    plain = row.original_size is None and row.crop_top_left == (0, 0)
    if model.family.startswith("sdxl") or plain:
        return []
    return [f"original size and crop are SDXL conditioning; this {model.family} model ignores them"]
