"""How small the gradients of a trained student's quantizer step sizes are (what Adam's epsilon acts on).

    python experiments/qparam_grads.py <run_dir> [--pairs 32]

Loads the run's saved student, its teacher and its calibration pairs (the cache), takes `--pairs` pairs spread evenly
over the set, backpropagates the whole-model noise-prediction MSE to the teacher through the student, and prints the
loss and, for the activation and the weight step sizes apart, how many gradients are nonzero, their median and
quartiles of |gradient|, and the share below 1e-8 (torch Adam's default epsilon; BENCHMARKS.md "Adam's epsilon").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from omegaconf import OmegaConf, open_dict

from dq.config import register_resolvers
from dq.models import load_teacher
from dq.quant import act_quantizers, load_quantized, weight_quantizers
from dq.student import calibration_set

ADAM_EPS = 1e-8


def summary(grads: torch.Tensor) -> str:
    """`n gradients, median, quartiles, share below ADAM_EPS` of the nonzero |gradients|."""
    g = grads.abs()
    g = g[g > 0].double()
    if not g.numel():
        return "no nonzero gradients"
    q1, median, q3 = (float(g.quantile(q)) for q in (0.25, 0.5, 0.75))
    below = float((g < ADAM_EPS).double().mean())
    return f"{g.numel()} gradients, median {median:.3g}, quartiles {q1:.3g} / {q3:.3g}, {below:.0%} below {ADAM_EPS:g}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a finished dq-train run directory")
    p.add_argument("--pairs", type=int, default=32, help="calibration pairs in the batch (spread over the set)")
    args = p.parse_args()
    register_resolvers()
    cfg = OmegaConf.load(args.run / ".hydra" / "config.yaml")
    with open_dict(cfg):
        cfg.run_dir, cfg.eval.progress = str(args.run), False
    teacher, scheduler = load_teacher(cfg.model.path)
    calib = calibration_set(cfg, teacher, scheduler)
    student = load_quantized(args.run / "student").eval()
    idx = torch.linspace(0, len(calib) - 1, min(args.pairs, len(calib))).round().long()
    x, t = calib.x_t[idx], calib.timesteps[idx]
    with torch.no_grad():
        target = teacher.eval()(x, t).sample
    student.requires_grad_(True)
    loss = torch.nn.functional.mse_loss(student(x, t).sample, target)
    loss.backward()
    for kind, quantizers in (("activation", act_quantizers(student)), ("weight", weight_quantizers(student))):
        grads = [q.scale.grad.flatten() for _, q in quantizers if q.scale.grad is not None]
        print(f"{kind} step sizes: " + (summary(torch.cat(grads)) if grads else "no gradients"))
    print(f"loss {loss.item():.3g} on {len(idx)} calibration pairs")


if __name__ == "__main__":
    main()
