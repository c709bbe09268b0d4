"""bench/activations.py's counter, on plain tensors and on the tiny SD model's U-Net.

The figures in worker/passes.py come from this counter run on the full-size U-Nets; these tests
keep it honest where it is cheap: it counts what ops make, once per storage, until it is freed,
and on a real U-Net call it sees a peak that grows with the image.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.activations import LiveBytes, guided_inputs, measure_call
from worker.models import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_counter_counts_a_storage_once_while_it_lives() -> None:
    # Given a weight that exists before counting starts
    weight = torch.ones(256)
    counter = LiveBytes(exclude=[weight])
    with torch.inference_mode(), counter:
        # When an op makes a tensor, and views of it and of the weight are taken
        made = weight * 2
        view = made[128:]
        alias = weight.view(16, 16)
        # Then the new storage is counted once, the weight not at all
        assert counter.live_bytes == 256 * 4
        # And freeing its last view uncounts it
        del made, view, alias
        assert counter.live_bytes == 0
    assert counter.peak_bytes == 256 * 4


def test_tiny_unet_peak_grows_with_the_image(tiny_model_dir: Path) -> None:
    # Given the tiny SD model's U-Net, called as the sampler calls it with guidance
    model = load_model("tiny", str(tiny_model_dir))
    peaks = []
    for size in (64, 128):
        inputs = guided_inputs(model.unet, size, size, vae_scale_factor=model.vae_scale_factor)
        # When one call is measured
        measured = measure_call(model.unet, inputs)
        peaks.append(measured.peak_bytes)
        # Then attention went through SDPA, whose scores are never an op's output
        assert measured.ops["scaled_dot_product_attention"] > 0
        assert measured.ops["softmax"] + measured.ops["_softmax"] == 0
    # And the peak is positive and grows with the pixels (4x the pixels: well over 2x the bytes)
    assert peaks[0] > 0
    assert peaks[1] > 2 * peaks[0]
