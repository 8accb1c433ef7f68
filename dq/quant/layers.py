"""Quantized drop-in layers: `QuantConv2d` and `QuantLinear`.

A quantized layer computes `conv/linear(Q_a(x · in_scale), Q_w(W))`. `W` stays the float latent weight (trained
by distillation), `in_scale` is the per-input-channel factor Weight Dilation installs (1/s, ones by default).
A conv whose input is a skip concatenation can split its activation quantizer at channel `split`
(`act_quantizer` for `[:split]`, `act_quantizer_skip` for `[split:]`, see `dq.quant.split`).
In eval mode without autograd the fake-quantized weight is cached and reused across calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from dq.quant.quantizer import HALF_DTYPES, SCALE_MIN, StepContext, TemporalQuantizer, UniformQuantizer
from dq.quant.spec import QuantizerSpec

__all__ = ["QuantConv2d", "QuantLinear", "QuantLayerMixin", "quantized_weight_layers"]


def _tensor_key(t: Tensor) -> tuple:
    return (id(t), t._version, t.data_ptr(), t.dtype, t.device)


class QuantLayerMixin:
    """Quantizer set-up and the cached fake-quantized weight shared by `QuantConv2d` and `QuantLinear`."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    weight_quantizer: UniformQuantizer
    act_quantizer: TemporalQuantizer
    in_scale: Tensor  # [C_in] multiplies the input before its quantizer (1/s of Weight Dilation)
    split: int  # 0: one activation quantizer; else channels [split:] have their own (act_quantizer_skip)

    def _setup_quant(
        self,
        weight_spec: QuantizerSpec,
        act_spec: QuantizerSpec,
        ctx: StepContext | None,
        in_channels: int,
        init_weights: bool,
        split: int = 0,
    ) -> None:
        w = self.weight
        self.weight_quantizer = UniformQuantizer(weight_spec, w.shape[0]).to(device=w.device, dtype=w.dtype)
        if init_weights:
            self.weight_quantizer.init_from(w)
        self.act_quantizer = TemporalQuantizer(act_spec, ctx).to(device=w.device, dtype=w.dtype)
        if not 0 <= split < in_channels:
            raise ValueError(f"split={split} is invalid for a layer with {in_channels} input channels")
        self.split = split
        if split:
            self.act_quantizer_skip = TemporalQuantizer(act_spec, self.act_quantizer.step_context).to(
                device=w.device, dtype=w.dtype
            )
        self.register_buffer("in_scale", torch.ones(in_channels, device=w.device, dtype=w.dtype))
        self._wq_cache: tuple[tuple, Tensor] | None = None

    def _cache_key(self) -> tuple:
        wq = self.weight_quantizer
        return (
            _tensor_key(self.weight),
            _tensor_key(wq.scale),
            _tensor_key(wq.zero_point),
            wq.enabled,
            wq.initialized,
        )

    def quantized_weight(self) -> Tensor:
        """The fake-quantized weight `Q_w(W)`; cached in eval mode when no gradient is recorded.

        The cache key holds the version counters, ids and storage of the weight, Δ_w and z_w plus the quantizer
        flags, so optimizer steps, `load_state_dict`, in-place edits and `.to()` all invalidate it. A weight computed
        on every access (an adapter, `dq.quant.lora`) is never cached: a new tensor can reuse a freed one's id; nor is
        one with a learned rounding (`dq.quant.adaround`), whose α changes while the weight does not.
        """
        learned = self.weight_quantizer.rounding is not None
        if self.training or torch.is_grad_enabled() or parametrize.is_parametrized(self, "weight") or learned:
            self._wq_cache = None
            return self.weight_quantizer(self.weight)
        key = self._cache_key()
        if self._wq_cache is not None and self._wq_cache[0] == key:
            return self._wq_cache[1]
        wq = self.weight_quantizer(self.weight)
        self._wq_cache = (key, wq)
        return wq

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
        """`nn.Module._apply` (`.to`, `.half`, ...); before a cast to float16 / bfloat16 the latent weight is first
        snapped onto its grid (`W := Q_w(W)`, which leaves `Q_w(W)` unchanged bit for bit).

        Trained latent weights gather at rounding edges (a default W4A8 student: 6.3 % within 0.01 of a step of one,
        against 2 % for evenly spread ones), where the cast's relative error of 2^-11 (2^-8) moves many across: that
        student, 28.1 dB PSNR to the teacher in float32, sampled 24.4 dB cast plainly to float16 or bfloat16, and
        28.5 / 27.9 dB snapped first (`experiments/half_precision.py`). A weight computed from adapters (LoRA) is left
        as it is: merge them first. The snap is for sampling: training in true half precision would start from snapped
        weights (dq-train refuses `trainer.precision=16-true` / `bf16-true`; the mixed ones keep float32 weights).
        """
        wq = getattr(self, "weight_quantizer", None)  # None while nn.Conv2d / nn.Linear build the layer
        w = None if wq is None or parametrize.is_parametrized(self, "weight") else self.weight
        snap = w is not None and w.dtype not in HALF_DTYPES and wq.enabled and wq.initialized
        if snap and fn(w.detach()[:0]).dtype in HALF_DTYPES:  # what the cast does to an empty slice: no copy made
            with torch.no_grad():
                # code times the step as the cast will hold it: once cast, W / Δ is the code up to one rounding of
                # W (bfloat16: 2^-8 relative, under half a step for |code| < 128), where W snapped with the float32
                # Δ is rounded twice (W and Δ) and moved 0.6 % of 8-bit codes in bfloat16
                scale, zp = wq.grid(w)
                cast_scale = fn(scale).to(device=w.device, dtype=torch.float32).clamp_min(SCALE_MIN)
                w.data = ((wq.codes(w) - zp) * cast_scale).to(w.dtype)  # new tensor: a state_dict taken before keeps W
        return super()._apply(fn, recurse)

    def _quant_input(self, x: Tensor, channel_dim: int) -> Tensor:
        if x.dtype in HALF_DTYPES:  # x · (1/s) and its quantization in float32 (1/s reaches 1/s_max = 1e-4)
            return self._quant_input(x.float(), channel_dim).to(torch.result_type(x, self.in_scale))
        shape = [1] * x.ndim
        shape[channel_dim] = -1  # broadcast in_scale over the channel dim
        x = x * self.in_scale.reshape(shape)  # a new tensor, so the quantizers may overwrite it when sampling
        inplace = not torch.is_grad_enabled()
        if not self.split:
            return self.act_quantizer(x, inplace=inplace)
        hidden, skip = x.split([self.split, x.shape[channel_dim] - self.split], dim=channel_dim)
        if inplace:  # each quantizer writes its own channels of `x`: no concatenation
            self.act_quantizer(hidden, inplace=True)
            self.act_quantizer_skip(skip, inplace=True)
            return x
        return torch.cat([self.act_quantizer(hidden), self.act_quantizer_skip(skip)], dim=channel_dim)


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    """`nn.Conv2d` with a per-channel weight quantizer and a (temporal) input-activation quantizer."""

    @classmethod
    def from_float(
        cls,
        module: nn.Conv2d,
        weight_spec: QuantizerSpec,
        act_spec: QuantizerSpec,
        ctx: StepContext | None = None,
        init_weights: bool = True,
        split: int = 0,
    ) -> QuantConv2d:
        """Wrap `module`, reusing its weight and bias Parameters; the weight quantizer is initialised from W.

        Args:
            module: The float convolution.
            weight_spec: Weight quantizer spec.
            act_spec: Input-activation quantizer spec.
            ctx: Shared step context of the model (a private one when None).
            init_weights: Initialise the weight quantizer from W now (False: a state dict will set it).
            split: 0, or the input channel where a skip concatenation starts (its own activation quantizer).
        """
        new = cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
            device="meta",
        )
        new.weight = module.weight
        new.bias = module.bias
        new._setup_quant(weight_spec, act_spec, ctx, module.in_channels, init_weights, split)
        new.train(module.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self._quant_input(x, 1), self.quantized_weight(), self.bias)


class QuantLinear(QuantLayerMixin, nn.Linear):
    """`nn.Linear` with a per-channel weight quantizer and a (temporal) input-activation quantizer."""

    @classmethod
    def from_float(
        cls,
        module: nn.Linear,
        weight_spec: QuantizerSpec,
        act_spec: QuantizerSpec,
        ctx: StepContext | None = None,
        init_weights: bool = True,
    ) -> QuantLinear:
        """Wrap `module`, reusing its weight and bias Parameters; the weight quantizer is initialised from W.

        Args:
            module: The float linear layer.
            weight_spec: Weight quantizer spec.
            act_spec: Input-activation quantizer spec.
            ctx: Shared step context of the model (a private one when None).
            init_weights: Initialise the weight quantizer from W now (False: a state dict will set it).
        """
        new = cls(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        new.weight = module.weight
        new.bias = module.bias
        new._setup_quant(weight_spec, act_spec, ctx, module.in_features, init_weights)
        new.train(module.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self._quant_input(x, -1), self.quantized_weight(), self.bias)


def quantized_weight_layers(modules: Iterable[nn.Module]) -> list[QuantLayerMixin]:
    """The quantized layers in `modules` (and below) whose weight quantizer is enabled and initialised, deduplicated,
    in module order."""
    seen: dict[int, QuantLayerMixin] = {}
    for root in modules:
        for m in root.modules():
            if isinstance(m, QuantLayerMixin) and m.weight_quantizer.enabled and m.weight_quantizer.initialized:
                seen.setdefault(id(m), m)
    return list(seen.values())
