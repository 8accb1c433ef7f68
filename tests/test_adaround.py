"""AdaRound (dq.quant.adaround) against plain formulas, and in block-wise distillation (`distill.lr_rounding`)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from dq.quant import QuantizerSpec, QuantSpec, quantize_model, quantized_weight_layers
from dq.quant.adaround import (
    GAMMA,
    ZETA,
    AdaRound,
    attach_adaround,
    bake_adaround,
    rounding_beta,
    rounding_loss,
)
from dq.quant.layers import QuantConv2d
from dq.quant.lora import add_lora
from dq.quant.quantizer import UniformQuantizer

pytestmark = pytest.mark.usefixtures("one_thread")


def conv(seed: int = 0, bits: int = 4) -> QuantConv2d:
    torch.manual_seed(seed)
    spec = QuantizerSpec(bits)
    return QuantConv2d.from_float(nn.Conv2d(6, 5, 3), spec, spec, None)


def plain_h(alpha: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)


def test_soft_rounding_starts_at_the_weight_itself():
    layer = conv()
    w = layer.weight.detach().clone()
    (rounding,) = attach_adaround([layer])
    scale, zp = layer.weight_quantizer.grid(w)
    assert_close(rounding.soft(), w / scale - torch.floor(w / scale), atol=1e-5, rtol=0)  # h(α) = W/Δ - floor(W/Δ)
    codes = w / scale + zp
    inside = (codes >= 0) & (codes <= 15)  # min-max ranges, z rounded: a row's end can lie under a step beyond
    assert inside.float().mean() > 0.9
    assert_close(layer.quantized_weight()[inside], w[inside], atol=1e-5, rtol=0)


def test_forward_is_floor_plus_h_on_the_grid_and_trains_alpha_only():
    layer = conv(1)
    wq = layer.weight_quantizer
    (rounding,) = attach_adaround([layer])
    with torch.no_grad():
        rounding.alpha.copy_(torch.randn(rounding.alpha.shape, generator=torch.Generator().manual_seed(3)) * 3)
    w = layer.weight.detach()
    scale, zp = wq.grid(w)
    expected = scale * (torch.clamp(torch.floor(w / scale) + plain_h(rounding.alpha.detach()) + zp, 0, 15) - zp)
    out = layer.quantized_weight()
    assert_close(out, expected)
    out.sum().backward()
    assert rounding.alpha.grad is not None and rounding.alpha.grad.abs().sum() > 0
    assert layer.weight.grad is None or not layer.weight.grad.any()  # the weight is fixed under AdaRound
    assert wq.scale.grad is None and wq.zero_point.grad is None  # and so is its grid (BRECQ)


def test_the_cached_weight_follows_alpha():
    """In eval mode without gradients the quantized weight is cached by the weight's and Δ's versions: α changes
    neither, so a layer with a learned rounding is not cached."""
    layer = conv(2).eval()
    (rounding,) = attach_adaround([layer])
    with torch.no_grad():
        before = layer.quantized_weight().clone()
        rounding.alpha.add_(5.0)  # every h(α) to 1: round up
        after = layer.quantized_weight()
    assert not torch.equal(before, after)


def test_regularizer_and_beta_schedule_match_plain_formulas():
    alpha = torch.linspace(-4, 4, 41)
    r = AdaRound(torch.zeros(41), torch.ones(1))
    with torch.no_grad():
        r.alpha.copy_(alpha)
    for beta in (20.0, 7.5, 2.0):
        expected = (1 - (2 * plain_h(alpha) - 1).abs() ** beta).sum()
        assert_close(r.regularizer(beta), expected)
    assert_close(rounding_loss([r, r], 2.0), 2 * r.regularizer(2.0))
    with torch.no_grad():
        r.alpha.copy_(torch.where(alpha >= 0, 10.0, -10.0))  # h exactly 0 or 1
    assert r.regularizer(2.0).item() == 0.0
    # BRECQ's LinearTempDecay over 100 steps: nothing for the first 20, then 20 -> 2 linearly
    assert [rounding_beta(i, 100) for i in (0, 19)] == [None, None]
    assert [rounding_beta(i, 100) for i in (20, 60, 100)] == pytest.approx([20.0, 11.0, 2.0])


def test_bake_writes_the_chosen_codes_and_leaves_an_ordinary_layer():
    layer = conv(4)
    w0 = layer.weight.detach().clone()
    state_keys = set(layer.state_dict())
    (rounding,) = attach_adaround([layer])
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        rounding.alpha.copy_(torch.randn(rounding.alpha.shape, generator=g))
    scale, zp = layer.weight_quantizer.grid(w0)
    hard_codes = torch.clamp(torch.floor(w0 / scale) + (rounding.alpha >= 0).float() + zp, 0, 15)
    nearest = torch.clamp(torch.round(w0 / scale) + zp, 0, 15)
    changed = bake_adaround([layer])
    assert layer.weight_quantizer.rounding is None and set(layer.state_dict()) == state_keys
    assert changed == int((hard_codes != nearest).sum()) > 0
    assert torch.equal(layer.weight_quantizer.codes(layer.weight), hard_codes)
    assert_close(layer.quantized_weight(), scale * (hard_codes - zp))
    assert bake_adaround([layer]) == 0  # nothing left to bake


def test_attach_finds_every_quantized_weight_and_refuses_adapters(teacher):
    student = copy.deepcopy(teacher)
    quantize_model(student, QuantSpec(weight_bits=4, act_bits=8), list(range(3)))
    layers = quantized_weight_layers([student])
    expected = [m for m in student.modules() if isinstance(getattr(m, "weight_quantizer", None), UniformQuantizer)]
    assert layers == expected
    roundings = attach_adaround([student.down_blocks[0]])
    assert len(roundings) == len(quantized_weight_layers([student.down_blocks[0]])) > 0
    bake_adaround([student])
    add_lora(student, 2)
    with pytest.raises(ValueError, match="merge them first"):
        attach_adaround([student.conv_in])
