"""Diagnostic (not a test): what min-max weight quantization alone does to the shipped teacher's noise prediction.

    python experiments/weight_quant_bias.py --bits w4a8

Builds the `dq-eval quantizer=ptq_minmax bits=<bits>` student (per-channel min-max weights, first/last layer at
8 bits), switches its activation quantizers off so only the weights are quantized, and compares its noise prediction
with the teacher's on training images noised to the DDIM steps' levels: relative MSE and the mean shift
(student - teacher) per timestep range. A mean shift that keeps its sign at every noise level is a bias that DDIM
amplifies at high noise (x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)); training the biases (BKD) removes it.
"""

from __future__ import annotations

import argparse
import json

import torch
from hydra import compose, initialize_config_dir

from dq.config import register_resolvers
from dq.data import load_mnist_split
from dq.models import load_teacher
from dq.paths import asset, conf_dir
from dq.quant import set_quant_state
from dq.student import quantize_student, sampler_timesteps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", default="w4a8", help="a `bits` config (only its weight bits matter here)")
    p.add_argument("--n", type=int, default=512, help="noised training images")
    p.add_argument("--teacher", default=None, help="a teacher directory (default: the shipped one)")
    args = p.parse_args()

    register_resolvers()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("eval", ["quantizer=ptq_minmax", f"bits={args.bits}"])
    torch.manual_seed(0)
    teacher, scheduler = load_teacher(args.teacher or asset("ddpm_mnist"))
    n_t = scheduler.config.num_train_timesteps
    x0 = load_mnist_split(0)["train"][0][: args.n]
    table = sampler_timesteps(scheduler, cfg.model.num_inference_steps)  # the student is tied to the sampler's steps
    t = table[torch.randint(0, len(table), (len(x0),))]
    x_t = scheduler.add_noise(x0, torch.randn_like(x0), t)
    student = quantize_student(cfg, teacher, scheduler)
    set_quant_state(student, weights=True, acts=False)
    with torch.no_grad():
        ref = torch.cat([teacher(x, s).sample for x, s in zip(x_t.split(128), t.split(128), strict=True)])
        out = torch.cat([student(x, s).sample for x, s in zip(x_t.split(128), t.split(128), strict=True)])

    report: dict = {"bits": args.bits, "n": len(x0), "per_t": {}}
    width = n_t // 5
    for lo in range(0, n_t, width):
        sel = (t >= lo) & (t < lo + width)
        err = out[sel] - ref[sel]
        report["per_t"][f"{lo}-{lo + width - 1}"] = {
            "rel_mse": round((err.pow(2).mean() / ref[sel].pow(2).mean()).item(), 5),
            "mean_shift": round(err.mean().item(), 5),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
