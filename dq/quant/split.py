"""Where a layer's input is a skip concatenation, and at which channel it splits (Q-Diffusion's shortcut splitting).

Every ResNet of a diffusers up block receives `cat([hidden_states, skip], dim=1)`, two tensors from different parts
of the network whose ranges differ a lot. Its `conv_shortcut` sees that concatenation raw (its `conv1` sees it
through a GroupNorm), so one per-tensor activation range fits neither part. A split quantizer gives each part its
own (Δ, z): the conv over the concatenation equals the sum of two convs over the parts, so integer kernels can run
it as two matmuls. The split channel is measured, not derived from the config: one forward pass on a tiny input
records the channel count of the skip tensor each up-block ResNet consumes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dq.models.example import trace_forward

__all__ = ["concat_splits"]


@torch.no_grad()
def concat_splits(unet: nn.Module, inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None) -> dict[str, int]:
    """`{layer name: split}` for every `conv_shortcut` of an up-block ResNet: channels `[:split]` are the upsampled
    hidden state, `[split:]` the skip connection.

    Args:
        unet: A diffusers UNet (float or quantized).
        inputs: `(args, kwargs)` of one forward pass (default: `dq.models.example.example_inputs(unet)`).

    Returns:
        The split channel of each such layer; empty for a UNet without skip-concatenating up blocks.
    """
    skips: dict[str, list[int]] = {}  # up block name -> channels of its skip tensors, in the order consumed

    def record(name: str):
        def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
            res = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else None)
            if res is not None:
                skips[name] = [r.shape[1] for r in reversed(res)]  # resnet i pops res[-1 - i]

        return hook

    ups = [(f"up_blocks.{i}", b) for i, b in enumerate(getattr(unet, "up_blocks", None) or [])]
    hooks = [b.register_forward_pre_hook(record(name), with_kwargs=True) for name, b in ups]
    trace_forward(unet, hooks, inputs, "concat_splits")

    splits: dict[str, int] = {}
    for name, block in ups:
        for i, resnet in enumerate(getattr(block, "resnets", None) or []):
            shortcut = getattr(resnet, "conv_shortcut", None)
            if shortcut is None or name not in skips or i >= len(skips[name]):
                continue
            split = shortcut.in_channels - skips[name][i]
            if 0 < split < shortcut.in_channels:
                splits[f"{name}.resnets.{i}.conv_shortcut"] = split
    return splits
