"""Diagnostic (not a test): what min-max weight quantization alone does to the shipped teacher's noise prediction.

    python experiments/weight_quant_bias.py --bits 4

Quantizes the weights only (per-channel min-max, activations float, first/last layer at 8 bits as in `bits/*.yaml`)
and compares the noise prediction with the teacher's on noised training images: relative MSE and the mean shift
(student - teacher) per timestep range. A mean shift that keeps its sign at every noise level is a bias DDIM
amplifies at high noise (x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)); training the biases (BKD) removes it.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from diffusers import DDPMScheduler

from dq.data import load_mnist_split
from dq.models import load_teacher
from dq.paths import asset
from dq.quant import QuantSpec, quantize_model, set_quant_state


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--n", type=int, default=512, help="noised training images")
    p.add_argument("--teacher", default=None, help="a teacher directory (default: the shipped one)")
    args = p.parse_args()

    torch.manual_seed(0)
    teacher, _ = load_teacher(args.teacher or asset("ddpm_mnist"))
    ddpm = DDPMScheduler(num_train_timesteps=1000)
    x0 = load_mnist_split(0)["train"][0][: args.n]
    t = torch.randint(0, ddpm.config.num_train_timesteps, (len(x0),))
    x_t = ddpm.add_noise(x0, torch.randn_like(x0), t)
    student = copy.deepcopy(teacher)
    spec = QuantSpec(weight_bits=args.bits, quantize_attention=False, keep_8bit=["conv_in", "conv_out"])
    quantize_model(student, spec)
    set_quant_state(student, weights=True, acts=False)
    with torch.no_grad():
        ref = torch.cat([teacher(x, s).sample for x, s in zip(x_t.split(128), t.split(128), strict=True)])
        out = torch.cat([student(x, s).sample for x, s in zip(x_t.split(128), t.split(128), strict=True)])

    report: dict = {"bits": args.bits, "n": len(x0), "per_t": {}}
    for lo in range(0, 1000, 200):
        sel = (t >= lo) & (t < lo + 200)
        err = out[sel] - ref[sel]
        report["per_t"][f"{lo}-{lo + 199}"] = {
            "rel_mse": round((err.pow(2).mean() / ref[sel].pow(2).mean()).item(), 5),
            "mean_shift": round(err.mean().item(), 5),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
