"""Benchmark: what `dq-train` costs on a model the size of the paper's main one (DDPM CIFAR-10, 35.7M parameters).

    python experiments/bench_scale.py ROOT [dq-train overrides, e.g. trainer=gpu experiment=paper_budget]

Writes a stand-in for google/ddpm-cifar10-32 to `ROOT/model`: the same diffusers `UNet2DModel` architecture and
DDPM schedule, with seeded random weights (no download; the real weights are not needed to measure cost). Then runs
`dq-train model=ddpm_cifar10 eval=none` on it into `ROOT/run` and prints what results.json records: distillation
seconds (calibration set, TPQ calibration and BKD together), peak host / GPU memory, and the slowest blocks. The
quality of a random teacher means nothing; the time and memory are those of the real model at the same settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

# google/ddpm-cifar10-32's unet/config.json and scheduler/scheduler_config.json (the values that differ from
# diffusers' defaults, and the ones that set the architecture)
CIFAR10_UNET = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), downsample_padding=0,
    flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32, attention_head_dim=None,
    mid_block_scale_factor=1,
)  # fmt: skip
CIFAR10_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=True,
    variance_type="fixed_large",
)  # fmt: skip


def write_standin(path: Path, seed: int = 0) -> int:
    """Save the random-weight stand-in as a diffusers directory (`unet/`, `scheduler/`); returns its parameter count."""
    torch.manual_seed(seed)
    unet = UNet2DModel(**CIFAR10_UNET)
    unet.save_pretrained(path / "unet", safe_serialization=True)
    DDPMScheduler(**CIFAR10_SCHEDULER).save_pretrained(path / "scheduler")
    return sum(p.numel() for p in unet.parameters())


def main(root: Path, overrides: list[str]) -> None:
    model, run = root / "model", root / "run"
    if run.exists():  # dq-train would resume it and time only what is left
        sys.exit(f"{run} exists: give bench_scale.py a new ROOT (the stand-in in ROOT/model is reused if there)")
    if not (model / "unet" / "config.json").is_file():
        print(f"stand-in for google/ddpm-cifar10-32: {write_standin(model) / 1e6:.1f}M parameters -> {model}")
    cmd = [sys.executable, "-m", "dq.train", "model=ddpm_cifar10", f"model.path={model}", "eval=none",
           "logger=csv", f"hydra.run.dir={run}", *overrides]  # fmt: skip
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=os.environ)
    cost = json.loads((run / "results.json").read_text())["cost"]
    blocks = sorted(cost.get("block_s", {}).items(), key=lambda kv: -kv[1])
    gpu = f", peak GPU memory {cost['peak_gpu_mem_mb'] / 1024:.2f} GB" if "peak_gpu_mem_mb" in cost else ""
    print(f"distillation {cost['train_s']:.0f} s for {cost['blocks']} blocks ({sum(s for _, s in blocks):.0f} s in "
          f"the blocks themselves), peak host memory {cost['peak_mem_mb'] / 1024:.2f} GB{gpu}")  # fmt: skip
    print("slowest blocks: " + ", ".join(f"{name} {s:.1f} s" for name, s in blocks[:5]))


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("-") or "=" in sys.argv[1]:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), sys.argv[2:])
