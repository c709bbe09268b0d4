"""Output formats without a farm: each format carries A1111's `parameters` where A1111 puts them,
sd-parsers (a third-party reader) reads them back, the spec's rules about formats, keys,
thumbnails, manifest lines and the intact-file checks of `sdfarm fetch`."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError
from sd_parsers import ParserManager

from producer.commands import _png_infotexts
from producer.download import image_intact
from producer.manifest import manifest_line
from shared.image_formats import FORMATS as FORMATS_BY_NAME
from shared.image_formats import format_of_key, read_image_metadata, thumbnail_webp
from shared.jobs import JobSpec, JobState
from shared.ledger.records import JobRecord
from shared.metadata import encode_image, infotext
from shared.object_keys import image_key, thumbnail_key
from shared.routing import compat_key
from shared.storage import open_storage
from tests.fixtures_api import Api

FORMATS = ("png", "webp", "jpeg")


def spec_of(output_format: str, **fields: Any) -> dict[str, Any]:
    base = {
        "prompt": "a lighthouse at dusk, (golden light:1.2), ünïcødé 灯台",
        "negative_prompt": "blurry",
        "model": "tiny",
        "scheduler": "euler_a",
        "steps": 23,
        "guidance": 6.5,
        "seed": 424242,
        "output_format": output_format,
    }
    return JobSpec.model_validate({**base, **fields}).model_dump()


def smooth_image(side: int = 96) -> Image.Image:
    """Gradients and a disc: what a lossy format keeps close, unlike noise."""
    y, x = np.mgrid[0:side, 0:side] / side
    rgb = np.stack([x, y, (x + y) / 2], axis=-1) * 255
    rgb[(x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.05] = (250, 240, 30)
    return Image.fromarray(rgb.astype(np.uint8))


def encoded(output_format: str, image: Image.Image | None = None, **fields: Any) -> bytes:
    return encode_image(
        image or smooth_image(),
        spec_of(output_format, **fields),
        model_name="tiny",
        model_hash="abcdef1234",
        extra={"job_id": "b0-1"},
    )


@pytest.mark.parametrize("output_format", FORMATS)
def test_sd_parsers_reads_prompt_seed_steps_and_cfg_back_from_every_format(
    output_format: str,
) -> None:
    # Given an image encoded in the format
    data = encoded(output_format)
    # When sd-parsers, a reader that knows nothing of sdfarm, parses it
    info = ParserManager().parse(io.BytesIO(data))
    # Then it finds A1111's parameters: the prompt, negative prompt, seed, steps and CFG
    assert info is not None, output_format
    assert info.generator.name == "AUTOMATIC1111"
    assert [p.value for p in info.prompts] == [spec_of("png")["prompt"]]
    assert [p.value for p in info.negative_prompts] == ["blurry"]
    sampler = info.samplers[0]
    assert sampler.parameters["seed"] == "424242"
    assert sampler.parameters["steps"] == "23"
    assert sampler.parameters["cfg_scale"] == "6.5"
    assert sampler.name == "Euler a"


@pytest.mark.parametrize("output_format", FORMATS)
def test_every_format_carries_the_infotext_and_the_json_spec(output_format: str) -> None:
    spec = spec_of(output_format)
    data = encoded(output_format)
    found = read_image_metadata(data)
    assert found["parameters"] == infotext(spec, model_name="tiny", model_hash="abcdef1234")
    record = json.loads(found["sdfarm"])
    assert record["spec"] == spec and record["job_id"] == "b0-1"
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}[output_format]


@pytest.mark.parametrize("output_format", ["webp", "jpeg"])
def test_user_comment_is_written_as_a1111_writes_it(output_format: str) -> None:
    # A1111: piexif.helper.UserComment.dump(text, encoding="unicode") in the Exif IFD
    data = encoded(output_format)
    with Image.open(io.BytesIO(data)) as image:
        comment = image.getexif().get_ifd(0x8769)[0x9286]
    text = infotext(spec_of(output_format), model_name="tiny", model_hash="abcdef1234")
    assert comment == b"UNICODE\0" + text.encode("utf_16_be")


def test_webp_without_quality_is_lossless_and_with_it_is_not() -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))

    def pixels(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as decoded:
            return np.asarray(decoded.convert("RGB"))

    assert np.array_equal(pixels(encoded("webp", image)), np.asarray(image))
    assert not np.array_equal(pixels(encoded("webp", image, quality=50)), np.asarray(image))
    assert len(encoded("jpeg", image, quality=20)) < len(encoded("jpeg", image, quality=95))


def test_quality_with_png_is_refused_naming_the_field() -> None:
    with pytest.raises(ValidationError) as caught:
        JobSpec(prompt="a", quality=80)
    (error,) = caught.value.errors()
    assert error["loc"] == ("quality",)
    assert "webp or jpeg" in error["msg"] and "png" in error["msg"]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"output_format": "gif"}, "output_format"),
        ({"output_format": "jpeg", "quality": 0}, "quality"),
        ({"output_format": "webp", "quality": 101}, "quality"),
        ({"output_format": "jpeg", "prompt": "x" * 16_000}, "output_format"),
    ],
)
def test_a_bad_format_or_quality_is_refused_naming_the_field(
    fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate({"prompt": "a", **fields})
    assert [e["loc"] for e in caught.value.errors()] == [(field,)]


def test_the_format_is_not_part_of_the_compatibility_key() -> None:
    # Formats are chosen after rendering: jobs that differ only in them share a pass
    png = JobSpec(prompt="a", model="tiny")
    for fields in ({"output_format": "webp"}, {"output_format": "jpeg", "quality": 70}):
        other = JobSpec(prompt="b", model="tiny", **fields)  # type: ignore[arg-type]
        assert compat_key(other) == compat_key(png)
    assert compat_key(JobSpec(prompt="a", model="tiny", steps=9)) != compat_key(png)


def test_keys_follow_the_format_and_thumbnails_lie_beside_the_images() -> None:
    assert image_key("p/", "b1", "b1-0", "webp") == "p/b1/b1-0.webp"
    assert image_key("p", "b1", "b1-0") == "p/b1/b1-0.png"
    assert thumbnail_key("p", "b1", "b1-0") == "p/b1/thumbs/b1-0.webp"
    assert format_of_key("p/b1/b1-0.jpg").mime == "image/jpeg"
    assert format_of_key("p/b1/b1-0.webp").mime == "image/webp"
    assert format_of_key("p/b1.x/b1-0").mime == "image/png"


@pytest.mark.parametrize(("size", "expected"), [((512, 768), (171, 256)), ((64, 48), (64, 48))])
def test_a_thumbnail_is_a_webp_with_its_longest_side_at_most_the_setting(
    size: tuple[int, int], expected: tuple[int, int]
) -> None:
    data = thumbnail_webp(smooth_image(max(size)).resize(size), 256)
    with Image.open(io.BytesIO(data)) as thumb:
        assert (thumb.format, thumb.size) == ("WEBP", expected)


def test_a_manifest_line_carries_format_content_type_and_thumbnail_key() -> None:
    spec = spec_of("webp", quality=80)
    result = {"key": "p/b/b-0.webp", "format": "webp", "content_type": "image/webp"}
    record = JobRecord(
        job_id="b-0",
        state="succeeded",
        spec=spec,
        result={**result, "thumbnail_key": "p/b/thumbs/b-0.webp"},
    )
    line = manifest_line(record)
    assert (line["format"], line["content_type"]) == ("webp", "image/webp")
    assert line["thumbnail_key"] == "p/b/thumbs/b-0.webp"
    # A job not yet rendered shows the format it asked for; one from before formats is a PNG
    queued = manifest_line(JobRecord(job_id="b-1", state="queued", spec=spec_of("jpeg")))
    assert (queued["format"], queued["content_type"], queued["thumbnail_key"]) == (
        "jpeg",
        "image/jpeg",
        None,
    )
    old = {k: v for k, v in spec.items() if k not in ("output_format", "quality")}
    assert manifest_line(JobRecord(job_id="b-2", state="queued", spec=old))["format"] == "png"


@pytest.mark.parametrize(("output_format", "name"), [("webp", "a.webp"), ("jpeg", "a.jpg")])
def test_fetch_refetches_a_webp_or_jpeg_cut_short(
    tmp_path: Path, output_format: str, name: str
) -> None:
    data = encoded(output_format, quality=80)
    path = tmp_path / name
    path.write_bytes(data)
    assert image_intact(path, len(data))
    path.write_bytes(data[:-10])
    assert not image_intact(path, None)
    assert not image_intact(path, len(data))


def test_from_png_reads_infotexts_from_webp_and_jpeg_too(tmp_path: Path) -> None:
    for number, output_format in enumerate(FORMATS):
        suffix = {"png": "png", "webp": "webp", "jpeg": "jpg"}[output_format]
        (tmp_path / f"{number}.{suffix}").write_bytes(encoded(output_format))
    found = _png_infotexts(tmp_path)
    assert [path.name for path, _ in found] == ["0.png", "1.webp", "2.jpg"]
    texts = {text for _, text in found}
    assert len(texts) == 1 and "Seed: 424242" in texts.pop()


@pytest.mark.parametrize(
    ("out", "extra", "expected"),
    [
        ("a.jpg", [], ("JPEG", None)),
        ("a.img", ["--format", "webp", "--quality", "60"], ("WEBP", 60)),
    ],
)
def test_sdfarm_render_writes_the_format_asked_or_named_by_its_file(
    tiny_model_dir: Path, tmp_path: Path, out: str, extra: list[str], expected: tuple[str, int]
) -> None:
    from worker.render_command import render, render_parser

    path = tmp_path / out
    options = ["--model", str(tiny_model_dir), "--prompt", "a heron", "--seed", "5"]
    options += ["--steps", "2", "--width", "64", "--height", "64", "--out", str(path), *extra]
    assert render(render_parser().parse_args(options)) == 0
    with Image.open(path) as image:
        assert image.format == expected[0]
    found = read_image_metadata(path.read_bytes())
    assert "Seed: 5" in found["parameters"]
    assert json.loads(found["sdfarm"])["spec"]["quality"] == expected[1]


@pytest.mark.parametrize("output_format", ["webp", "jpeg"])
def test_the_image_route_serves_a_file_store_image_with_its_formats_content_type(
    start_api: Callable[..., Api], tmp_path: Path, output_format: str
) -> None:
    # Given a job of a file:// farm whose image was stored in its format
    api = start_api(storage_url=f"file://{tmp_path}")
    submitted = api.http.post("/v1/batches", json={"prompts": ["a heron"]}).json()
    job_id = submitted["job_ids"][0]
    fmt = FORMATS_BY_NAME[output_format]
    storage = open_storage(api.settings.storage_url)
    key = image_key(storage.prefix, submitted["batch_id"], job_id, fmt.extension)
    data = encoded(output_format)
    storage.put(key, data, fmt.mime)
    result = {"key": key, "uri": storage.describe(key), "bytes": len(data)}
    api.ledger.force(job_id, [JobState.QUEUED], JobState.RUNNING, {"worker": "w"})
    api.ledger.force(job_id, [JobState.RUNNING], JobState.SUCCEEDED, {"result": result})
    # When its image is asked for
    response = api.http.get(f"/v1/jobs/{job_id}/image")
    # Then the bytes come with the format's Content-Type
    assert response.status_code == 200
    assert response.headers["content-type"] == fmt.mime
    assert response.content == data
