"""What a bench/gpu.py run measured: its JSON (rewritten after every configuration), its table."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

__all__ = ["Run", "print_table"]


class Run:
    """The results so far; written after every configuration, so a killed run still reports."""

    def __init__(self, out: Path, meta: dict[str, Any]) -> None:
        self.out = out
        self.data: dict[str, Any] = {**meta, "models": {}, "configs": [], "skipped": []}
        self.lock = threading.Lock()

    def add(self, key: str, value: Any) -> None:
        with self.lock:
            if isinstance(self.data.get(key), list):
                self.data[key].append(value)
            else:
                self.data[key] = value
            self.write()

    def add_fact(self, model: str, key: str, value: Any) -> None:
        """A figure of one model's (its size, build time, FLOPs), under "models"."""
        with self.lock:
            self.data["models"].setdefault(model, {})[key] = value
            self.write()

    def write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".partial")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.out)


def print_table(data: dict[str, Any]) -> None:
    """One table per model, its skipped configurations and its FLOPs; then the method."""
    for model, facts in data["models"].items():
        steps = facts["target_steps"]
        print(f"\n{facts['label']} on {data['device']}, {facts['size']}, torch {data['torch']}")
        head = f"{'engine':9} {'rows':>4} {'compiled':>14} {'it/s':>7} {'img/s@' + str(steps):>9} "
        print(head + f"{'s/img':>7} {'TFLOP/s':>8} {'peak%':>6} {'mem GiB':>7} {'warmup s':>8}")
        for c in data["configs"]:
            if c["model"] != model:
                continue
            kind = c.get("graph", "yes") if c["compiled"] else "no"
            print(
                f"{c['engine']:9} {c['rows']:>4} {kind:>14} {c['it_per_s']:>7.2f} "
                f"{c[f'images_per_s_{steps}']:>9.3f} {c[f's_per_image_{steps}']:>7.3f} "
                f"{c['tflops']:>8.1f} {100 * c['peak_fraction']:>5.1f}% "
                f"{c.get('peak_mem_gib', 0):>7.2f} {c['warmup_s']:>8.1f}"
            )
        for s in data["skipped"]:
            if s["model"] == model:
                print(f"skipped: {s}")
        if "flops" in facts:
            f = facts["flops"]
            issue = f.get("issue_image_tflop")
            print(
                f"FLOPs counted: U-Net step {f['unet_step_tflop']:.3f} TFLOP, VAE decode "
                f"{f['vae_decode_tflop']:.3f}, image at {steps} steps {f['image_tflop']:.1f}"
                + (f" (the issue says {issue:.0f})" if issue is not None else "")
            )
    print(data["method"])
    if "aborted" in data:
        print(f"ABORTED: {data['aborted']}")
