"""Benchmark (not a test): how much classifier-FID a known, controlled error on the teacher's samples costs.

    python experiments/fid_sensitivity.py --out experiments/tables/fid_sensitivity.md

Takes the teacher's DDIM samples of the `dq-train` evaluation (same noise, same N; from the cache when present),
perturbs them in three ways and scores each like a student: i.i.d. Gaussian pixel noise at a target PSNR, a mild
3x3 blur (mixing each pixel with its neighbourhood mean) and a constant brightness offset. The table shows which
PSNR-to-teacher an error needs before classifier-FID stays within a given ratio of FP: a ruler for the quality
targets (e.g. FID <= 1.15x FP) against the PSNR that quantized students reach.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from dq.config import register_resolvers
from dq.evaluation import build_metrics, teacher_samples
from dq.metrics import psnr
from dq.models import load_teacher, make_noise
from dq.paths import conf_dir

NOISE_STREAM = 0xF1D5  # tells the pixel noise's seed apart from the sampler's for the same `seed`


def perturbations(x: torch.Tensor, seed: int) -> list[tuple[str, torch.Tensor]]:
    """(label, perturbed images) for each controlled error; images in [-1, 1], [N, C, H, W].

    The pixel noise comes from a stream of its own for `seed`: `make_noise(seed)` drew the samples' starting noise
    x_T, and the same stream would add a multiple of x_T to each sample instead of noise independent of it.
    """
    stream = np.random.SeedSequence([seed, NOISE_STREAM]).generate_state(1)[0]
    gen = torch.Generator().manual_seed(int(stream))
    out = []
    for db in (20.0, 25.0, 27.5, 30.0, 32.5, 35.0, 40.0):
        sigma = 2.0 / 10 ** (db / 20)  # data range 2: PSNR = 20 log10(2 / sigma) before clamping
        noisy = (x + sigma * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
        out.append((f"Gaussian noise, sigma {sigma:.4f}", noisy))
    box = torch.ones(x.shape[1], 1, 3, 3) / 9  # per-channel 3x3 mean
    mean = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), box, groups=x.shape[1])
    for a in (0.05, 0.1, 0.2, 0.3):
        out.append((f"blur: {1 - a:.2f} x + {a:.2f} x 3x3 mean", (1 - a) * x + a * mean))
    for b in (0.02, 0.05, 0.1):
        out.append((f"offset +{b}", (x + b).clamp(-1, 1)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="dq-eval config overrides (eval.n_samples, seed, ...)")
    p.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    args = p.parse_args()

    register_resolvers()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("eval", [*args.overrides, "eval.progress=false"])
    teacher, scheduler = load_teacher(cfg.model.path)
    noise = make_noise(cfg.eval.n_samples, tuple(cfg.model.sample_shape), cfg.seed)
    samples, _ = teacher_samples(cfg, teacher, scheduler, noise)
    metrics = build_metrics(cfg)
    fp = metrics.score(samples, cfg.seed)

    rows = [("teacher (FP)", fp, float("inf"))]
    for label, x in perturbations(samples, cfg.seed):
        rows.append((label, metrics.score(x, cfg.seed), psnr(x, samples)))
        print(f"{label}: FID {rows[-1][1]['fid']:.2f}, PSNR {rows[-1][2]:.2f} dB", flush=True)
    lines = [
        f"Classifier-FID of the teacher's {cfg.eval.n_samples} DDIM-{cfg.model.num_inference_steps} samples "
        f"(seed {cfg.seed}) under controlled errors.",
        "",
        "| error | PSNR to teacher (dB) | classifier-FID | FID / FP | IS |",
        "|---|---|---|---|---|",
        *(
            f"| {label} | {db:.2f} | {m['fid']:.2f} | {m['fid'] / fp['fid']:.2f}x | {m['is']:.2f} |"
            for label, m, db in rows
        ),
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
