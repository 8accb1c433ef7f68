"""Benchmark (not a test): quality and speed of the shipped teacher and the noise floor of classifier FID.

    python experiments/teacher_quality.py --n 1000 5000 --figure experiments/figures/teacher_samples.png

Prints, as JSON: sampling throughput (images/s at DDIM-25), the share of samples the shipped classifier gives
max-softmax >= 0.9, the class histogram, classifier-FID/IS at each N, and holdout-vs-train FID (metric noise floor).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dq.data import load_mnist_split
from dq.metrics import MNISTClassifier, SampleMetrics
from dq.models import ddim_sample, load_teacher, make_noise
from dq.paths import asset
from dq.utils.grid import grid_array, save_png


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[1000])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--figure", default=None, help="write a 10x10 sample grid PNG here")
    p.add_argument("--teacher", default=None, help="a teacher directory (default: the shipped one)")
    p.add_argument("--device", default="cpu", help="where the teacher samples (cpu | cuda)")
    args = p.parse_args()

    teacher, scheduler = load_teacher(args.teacher or asset("ddpm_mnist"))
    teacher.to(args.device)
    clf = MNISTClassifier.load(asset("mnist_classifier"))
    metrics = SampleMetrics("classifier", classifier_path=asset("mnist_classifier"))
    split = load_mnist_split(0)
    metrics.set_reference(split["train"][0])
    report: dict = {"steps": args.steps, "device": args.device, "threads": torch.get_num_threads()}

    noise = make_noise(max(args.n), (1, 28, 28), args.seed)
    start = time.perf_counter()
    samples = ddim_sample(teacher, scheduler, noise, args.steps, batch_size=250)
    report["images_per_s"] = len(noise) / (time.perf_counter() - start)

    with torch.no_grad():
        probs = torch.cat([clf(x).softmax(1) for x in samples[:1000].split(500)])
    report["confident_share@1000"] = (probs.max(1).values >= 0.9).float().mean().item()
    report["class_share@1000"] = (torch.bincount(probs.argmax(1), minlength=10) / len(probs)).tolist()
    for n in args.n:
        report[f"teacher@{n}"] = metrics.score(samples[:n], seed=args.seed)
    report["holdout_vs_train@1000"] = metrics.score(split["holdout"][0], seed=args.seed)
    report["holdout_vs_train@500"] = metrics.score(split["holdout"][0][:500], seed=args.seed)
    if args.figure:
        save_png(grid_array(samples[:100], nrow=10), args.figure, scale=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
