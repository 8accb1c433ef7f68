"""What share of the teacher's multiply-accumulates and weights a set of layers holds (the cost of keeping them at
higher precision, e.g. `bits=w4a4_shortcut8`'s `keep_8bit`).

    python experiments/layer_share.py '*.conv_shortcut' [more names or globs] [--model-path DIR]

Layers are the convs and linears the names select (`dq.quant.spec.module_matches`, as for `keep_8bit`); MACs are
counted on one forward of one sample at the model's sample size.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from dq.models import load_teacher
from dq.paths import asset
from dq.quant.spec import module_matches


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="+", help="layer names, prefixes up to a dot or globs")
    p.add_argument("--model-path", default=asset("ddpm_mnist"), help="a local diffusers model directory")
    args = p.parse_args()
    teacher, _ = load_teacher(args.model_path)
    macs: dict[str, int] = {}

    def count(name: str):
        def hook(m: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
            per_output = m.weight[0].numel()  # MACs per output value: C_in / groups x kernel (conv), in_features
            macs[name] = out[0].numel() * per_output

        return hook

    layers = {n: m for n, m in teacher.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    for name, m in layers.items():
        m.register_forward_hook(count(name))
    size = teacher.config.sample_size
    with torch.no_grad():
        teacher(torch.randn(1, teacher.config.in_channels, size, size), torch.tensor([500]))
    chosen = [n for n in layers if any(module_matches(p, n) for p in args.names)]
    weights = {n: m.weight.numel() for n, m in layers.items()}
    share = lambda d: sum(d[n] for n in chosen) / sum(d.values())  # noqa: E731
    print(f"{len(chosen)} of {len(layers)} layers: {share(macs):.1%} of the MACs, {share(weights):.1%} of the weights")


if __name__ == "__main__":
    main()
