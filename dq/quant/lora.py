"""Low-rank adapters on quantized weights, merged before quantization (EfficientDM's QALoRA, He et al. 2023).

`add_lora(model, r)` turns the weight of every quantized layer that quantizes its weights into `W + B A` with
`torch.nn.utils.parametrize`: `W` the layer's full-precision weight, `A` [r, C_in/groups * kh * kw] and `B` [C_out, r]
new parameters, `B = 0` so the model starts unchanged. The weight quantizer sees the sum, so the adapters train through
the quantization, `Q(W + B A)`, not beside it as in QLoRA (`Q(W) x + B A x`). `merge_lora(model)` writes each sum into
the layer's own weight Parameter and removes the adapters: the result is an ordinary quantized model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from dq.quant.layers import QuantLayerMixin

__all__ = ["LowRankDelta", "adapter", "add_lora", "lora_layers", "merge_lora", "stored_weight"]


class LowRankDelta(nn.Module):
    """Parametrization `W -> W + (B @ A).view_as(W)` of one weight.

    `A` starts like an `nn.Linear` weight (Kaiming-uniform, a = sqrt(5)) and `B` at zero, as in LoRA and EfficientDM.
    For a conv, `B @ A` is EfficientDM's `r`-channel `kh x kw` conv followed by a 1x1 conv, folded into one kernel.

    Args:
        weight: The weight it will be registered on ([C_out, C_in] or [C_out, C_in/groups, kh, kw]).
        rank: r, cut to `min(C_out, C_in/groups * kh * kw)` (a larger rank adds nothing).
    """

    def __init__(self, weight: Tensor, rank: int) -> None:
        super().__init__()
        fan_in = weight[0].numel()
        r = min(rank, weight.shape[0], fan_in)
        self.A = nn.Parameter(torch.empty(r, fan_in, device=weight.device, dtype=weight.dtype))
        self.B = nn.Parameter(torch.zeros(weight.shape[0], r, device=weight.device, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, weight: Tensor) -> Tensor:
        return weight + (self.B @ self.A).view_as(weight)


def lora_layers(model: nn.Module) -> list[tuple[str, QuantLayerMixin]]:
    """The quantized layers of `model` that quantize their weights, in module order (the ones `add_lora` adapts)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayerMixin) and m.weight_quantizer.enabled]


def add_lora(model: nn.Module, rank: int) -> int:
    """Give every layer of `lora_layers(model)` that has none a `LowRankDelta` of `rank`; returns the new parameters'
    count. The layers' outputs do not change (`B = 0`)."""
    added = 0
    for _, layer in lora_layers(model):
        if not parametrize.is_parametrized(layer, "weight"):
            delta = LowRankDelta(layer.weight, rank)
            parametrize.register_parametrization(layer, "weight", delta)
            added += delta.A.numel() + delta.B.numel()
    return added


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Write `W + B A` into each adapted layer's weight Parameter (the same object as before `add_lora`) and remove
    the adapters; returns how many layers were merged."""
    merged = 0
    for layer in model.modules():
        if isinstance(layer, QuantLayerMixin) and parametrize.is_parametrized(layer, "weight"):
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
            merged += 1
    return merged


def adapter(layer: nn.Module) -> LowRankDelta | None:
    """`layer`'s adapter (`add_lora`), None without one."""
    if not parametrize.is_parametrized(layer, "weight"):
        return None
    return next((p for p in layer.parametrizations.weight if isinstance(p, LowRankDelta)), None)


def stored_weight(layer: nn.Module) -> Tensor:
    """The Parameter that holds `layer`'s weight: its own, or under an adapter (`add_lora`) the adapted `W`."""
    if parametrize.is_parametrized(layer, "weight"):
        return layer.parametrizations.weight.original
    return layer.weight
