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


def print_e2e(e2e: dict[str, Any]) -> None:
    """farm_e2e: the whole farm over HTTP against diffusers batched by hand, same jobs."""
    print(
        f"\nfarm end to end on {e2e['device']}: {e2e['jobs']} jobs, {e2e['size']}, "
        f"{e2e['steps']} steps, max_batch {e2e['max_batch']}, {e2e['storage']} storage; "
        f"diffusers batched by hand {e2e['diffusers_batched_images_per_s']:.3f} img/s"
    )
    print(f"{'worker':9} {'img/s':>8} {'x diffusers':>11} {'GPU busy':>8} {'peak%':>6} ready s")
    for name in ("eager", "compiled"):
        if name not in e2e:
            continue
        r = e2e[name]
        busy = "-" if r["gpu_busy_share"] is None else f"{100 * r['gpu_busy_share']:.0f}%"
        peak = "-" if r["share_of_peak"] is None else f"{100 * r['share_of_peak']:.1f}%"
        ready = ", ".join(f"{k} {v:.1f}" for k, v in r["ready_s"].items())
        print(
            f"{name:9} {r['images_per_s']:>8.3f} {r['ratio_to_diffusers_batched']:>10.2f}x "
            f"{busy:>8} {peak:>6} {ready}"
        )
