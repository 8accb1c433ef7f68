"""Diagnostic (not a test): what rounding one layer's input costs at that layer, and whether a rotation would help.

    python experiments/layer_input_sqnr.py up_blocks.2.resnets.1.conv_shortcut [more layers] [--bits 4 6 8]

Feeds the shipped FP teacher the calibration pairs (calib.seed 1, the default 512), records each named layer's input
and scores the layer's output SQNR against float with that input fake-quantized the way DilateQuant's activation
quantizers start: asymmetric, one (Δ, z) per tensor and per sampling step (TPQ), MSE-searched clipping, each half of
a split skip concatenation on its own. Weights stay float, so the figure is the input's rounding alone. Two
simplifications: the search sees every value of a step (calibration subsamples large steps), and Weight Dilation's
1/s is not applied (the input is X, not X / s). The table also
gives the share of the output error's energy that sits in its mean per step and output channel: the part a bias
correction (PTQD-style) could remove.

The `rotated` column turns the channels of each part by an orthonormal matrix H (Hadamard; random orthogonal where
the count is not a power of two) before rounding and back after (QuaRot-style: `(X H)(Hᵀ W) = X W`, so integer
kernels could fold Hᵀ into the weight). A rotation spreads outlier channels over all channels; where it gains
little, the channels hold no outlier to spread and the loss is the grid's resolution over the values' spread.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch import Tensor, nn

from dq.config import register_resolvers
from dq.metrics import sqnr_db
from dq.models import load_teacher
from dq.paths import asset, conf_dir
from dq.quant.quantizer import fake_quant_, mse_search
from dq.quant.split import concat_splits
from dq.student import calibration_set


def rotation(n: int) -> Tensor:
    """An orthonormal [n, n] rotation: Sylvester's Hadamard matrix where n is a power of two, else a seeded random
    orthogonal matrix (QR of a Gaussian one)."""
    if n & (n - 1):
        q, r = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(0)))
        return q * r.diagonal().sign()
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def round_per_tensor(v: Tensor, bits: int) -> Tensor:
    """`v` fake-quantized with one asymmetric (Δ, z) found by `mse_search` (DilateQuant's activation init)."""
    flat = v.reshape(1, -1)
    scale, zp = mse_search(flat, 0, 2**bits - 1, symmetric=False)
    return fake_quant_(flat.clone(), scale[:, None], zp[:, None], 0, 2**bits - 1).reshape(v.shape)


def rounded_input(x: Tensor, steps: Tensor, parts: list[tuple[int, int]], bits: int, rotate: bool) -> Tensor:
    """`x` [N, C, ...] rounded per step and per channel part, optionally in rotated coordinates."""
    out = torch.empty_like(x)
    for a, b in parts:
        rot = rotation(b - a).to(x) if rotate else None
        for i in steps.unique():
            v = x[steps == i, a:b].movedim(1, -1)  # channels last: [n, ..., c]
            q = round_per_tensor(v @ rot, bits) @ rot.T if rotate else round_per_tensor(v, bits)
            out[steps == i, a:b] = q.movedim(-1, 1)
    return out


def layer_output(layer: nn.Module, x: Tensor) -> Tensor:
    """The layer on `x` given channels first ([N, C, ...]); a linear's output keeps its channels last."""
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, layer.weight, layer.bias)
    return F.linear(x.movedim(1, -1), layer.weight, layer.bias)


def output_channel_dim(layer: nn.Module) -> int:
    return 1 if isinstance(layer, nn.Conv2d) else -1


def mean_share(err: Tensor, steps: Tensor, channel_dim: int) -> float:
    """Share of the error energy in its per-step, per-output-channel mean (what a bias correction could remove)."""
    dims = [d for d in range(err.ndim) if d != channel_dim % err.ndim]  # samples and positions
    mean = torch.zeros_like(err)
    for i in steps.unique():
        mean[steps == i] = err[steps == i].mean(dim=dims, keepdim=True)
    return (mean.square().sum() / err.square().sum()).item()


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("layers", nargs="+", help="module paths of Conv2d / Linear layers of the teacher")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 6, 8])
    p.add_argument("--calib-seed", type=int, default=1)
    args = p.parse_args()

    teacher, scheduler = load_teacher(asset("ddpm_mnist"))
    register_resolvers()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("eval", ["eval.progress=false", f"calib.seed={args.calib_seed}"])
    calib = calibration_set(cfg, teacher, scheduler)
    modules, splits = dict(teacher.named_modules()), concat_splits(teacher)
    missing = [n for n in args.layers if not isinstance(modules.get(n), nn.Conv2d | nn.Linear)]
    if missing:
        raise SystemExit(f"not a Conv2d / Linear of the teacher: {', '.join(missing)}")

    inputs: dict[str, list[Tensor]] = {n: [] for n in args.layers}
    hooks = [
        modules[n].register_forward_hook(lambda m, a, o, n=n: inputs[n].append(a[0].detach())) for n in args.layers
    ]
    for x, t in zip(calib.x_t.split(128), calib.timesteps.split(128), strict=True):
        teacher(x, t)
    for h in hooks:
        h.remove()

    print("| layer | input bits | output SQNR dB | error in its per-step channel means | rotated: output SQNR dB |")
    print("|---|---|---|---|---|")
    for name in args.layers:
        layer, x = modules[name], torch.cat(inputs[name])
        if isinstance(layer, nn.Linear):  # [N, ..., C] -> channels first, as a conv's input
            x = x.movedim(-1, 1)
        c, split = x.shape[1], splits.get(name, 0)
        parts = [(0, split), (split, c)] if split else [(0, c)]
        steps = calib.step_index
        ref = layer_output(layer, x)
        tag = f"{name} (split)" if split else name
        for bits in args.bits:
            out = layer_output(layer, rounded_input(x, steps, parts, bits, False))
            plain, bias = sqnr_db(out, ref), mean_share(out - ref, steps, output_channel_dim(layer))
            rotated = sqnr_db(layer_output(layer, rounded_input(x, steps, parts, bits, True)), ref)
            print(f"| {tag} | {bits} | {plain:.2f} | {100 * bias:.1f} % | {rotated:.2f} |")


if __name__ == "__main__":
    main()
