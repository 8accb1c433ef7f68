"""Numerics of the quantizers against a plain reference, and spec validation."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from dq.quant import QuantizerSpec, QuantSpec, StepContext, TemporalQuantizer, UniformQuantizer, fake_quant, quantizer
from dq.quant.quantizer import (
    MSE_RATIOS,
    OBSERVE_SAMPLES,
    fake_quant_,
    lsq_grad_scale,
    mse_search,
    stratified_subsample,
)


def ref_quant(x, scale, zp, qmin, qmax):
    """Plain reference: Δ · (clamp(round(x/Δ) + round(z), qmin, qmax) − round(z))."""
    return scale * (torch.clamp(torch.round(x / scale) + torch.round(zp), qmin, qmax) - torch.round(zp))


def ref_minmax(x_min, x_max, bits):
    """Reference asymmetric min-max parameters (range widened to include 0)."""
    x_min, x_max = torch.clamp(x_min, max=0), torch.clamp(x_max, min=0)
    scale = (x_max - x_min) / (2**bits - 1)
    return scale, torch.clamp(-torch.round(x_min / scale), 0, 2**bits - 1)


# ---- fake_quant ------------------------------------------------------------------------------------------------
def test_fake_quant_matches_reference_and_lies_on_integer_grid():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 6, generator=g) * 3
    scale, zp = torch.tensor(0.05), torch.tensor(7.3)  # zero-point is rounded to 7
    out = fake_quant(x, scale, zp, 0, 15, 1.0)
    assert_close(out, ref_quant(x, scale, zp, 0, 15), atol=0, rtol=0)
    grid = out / scale + 7
    assert_close(grid, grid.round(), atol=1e-4, rtol=0)
    assert grid.round().min() == 0 and grid.round().max() == 15  # clamped at both ends


def test_inplace_fake_quant_is_bit_identical_and_leaves_its_input():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, 7, generator=g) * 2
    before = x.clone()
    scale = torch.rand(6, 1, 1, generator=g) * 0.1  # one row at the SCALE_MIN clamp
    scale[0] = 0.0
    zp = torch.rand(6, 1, 1, generator=g) * 15
    out = fake_quant_(x, scale, zp, 0, 15)
    assert torch.equal(out.view(torch.int32), fake_quant(x, scale, zp, 0, 15, 1.0).view(torch.int32))  # bits, ±0
    assert torch.equal(x, before)
    view = x[:, 1:4]  # inplace: the result is written into the caller's tensor (here a strided view) and returned
    assert fake_quant_(view, scale, zp, 0, 15, inplace=True) is view
    assert torch.equal(x[:, 1:4].view(torch.int32), out[:, 1:4].view(torch.int32))
    assert torch.equal(x[:, [0, 4]], before[:, [0, 4]])  # the channels outside the view are untouched


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_quantized_in_float32(dtype):
    """x / Δ in half precision moves values across rounding edges: both paths round in float32, like the reference on
    the same half-precision values in float32, and hand back the half dtype."""
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(6, 50, generator=g) * 2).to(dtype)
    scale = (torch.rand(6, 1, generator=g) * 0.02 + 0.01).to(dtype)  # 8-bit grids over about ±1..±3
    zp = torch.full((6, 1), 128.0, dtype=dtype)
    ref = ref_quant(x.float(), scale.float(), zp.float(), 0, 255).to(dtype)
    out = fake_quant(x, scale, zp, 0, 255, 1.0)
    assert out.dtype == dtype and torch.equal(out, ref)
    assert torch.equal(fake_quant_(x, scale, zp, 0, 255), ref)
    owned = x.clone()
    assert fake_quant_(owned, scale, zp, 0, 255, inplace=True) is owned and torch.equal(owned, ref)
    row = fake_quant_(x[0], scale, zp, 0, 255)  # a scale that broadcasts x to more rows: a new [6, 50] tensor
    assert row.dtype == dtype and torch.equal(row, ref_quant(x[0].float(), scale.float(), zp.float(), 0, 255).to(dtype))
    rounded_in_half = scale * (torch.clamp(torch.round(x / scale) + zp, 0, 255) - zp)
    assert not torch.equal(rounded_in_half, ref)  # the difference this test guards
    x.requires_grad_(True)
    fake_quant(x, scale, zp, 0, 255, 1.0).sum().backward()
    q = torch.round(x.detach().float() / scale.float()) + zp.float()
    assert x.grad.dtype == dtype and torch.equal(x.grad, ((q >= 0) & (q <= 255)).to(dtype))  # STE inside the grid


def ref_mse_search(values, qmin, qmax):
    """Plain reference: per row, each clipping ratio k/100 (k = 100..1) of the min-max range, the first ratio with
    the smallest squared error wins."""
    best = []
    for row in values:
        lo, hi = min(row.min(), 0), max(row.max(), 0)
        errs, params = [], []
        for k in range(MSE_RATIOS, 0, -1):
            r = torch.tensor(k / MSE_RATIOS)
            scale = ((hi * r - lo * r) / (qmax - qmin)).clamp_min(1e-8)
            zp = (qmin - torch.round(lo * r / scale)).clamp(qmin, qmax)
            errs.append((ref_quant(row, scale, zp, qmin, qmax) - row).pow(2).sum())
            params.append((scale, zp))
        best.append(params[int(torch.stack(errs).argmin())])
    return torch.stack([p[0] for p in best]), torch.stack([p[1] for p in best])


@pytest.mark.parametrize("ratios_per_chunk", [MSE_RATIOS, 7, 1])
def test_mse_search_matches_a_plain_per_ratio_loop(ratios_per_chunk, monkeypatch):
    g = torch.Generator().manual_seed(2)
    u = torch.rand(5, 3000, generator=g) - 0.5
    values = -torch.sign(u) * torch.log1p(-2 * u.abs())  # Laplace rows: the best ratio is below 1
    values[4] = values[4].abs() + 0.5  # all positive: the range is widened to include 0
    # A calibration sample of 2^16 values per row is searched in chunks of ratios; force the same split here
    monkeypatch.setattr(quantizer, "_MSE_CHUNK_ELEMENTS", ratios_per_chunk * values.numel())
    scale, zp = mse_search(values, 0, 15, symmetric=False)
    ref_scale, ref_zp = ref_mse_search(values, 0, 15)
    assert_close(scale, ref_scale, atol=0, rtol=1e-6)
    assert_close(zp, ref_zp, atol=0, rtol=0)
    assert (scale < (values.amax(1).clamp_min(0) - values.amin(1).clamp_max(0)) / 15).any()  # some rows clip


def test_fake_quant_clamps_to_range():
    scale, zp = torch.tensor(0.5), torch.tensor(2.0)  # representable range [-1.0, 6.5] for 4 bits
    x = torch.tensor([-100.0, -1.2, -1.0, 0.0, 0.26, 6.5, 6.8, 100.0])
    out = fake_quant(x, scale, zp, 0, 15, 1.0)
    assert_close(out, torch.tensor([-1.0, -1.0, -1.0, 0.0, 0.5, 6.5, 6.5, 6.5]), atol=0, rtol=0)


def test_fake_quant_clamps_tiny_scale():
    out = fake_quant(torch.tensor([1e-9, 1.0]), torch.tensor(0.0), torch.tensor(0.0), 0, 255, 1.0)
    assert torch.isfinite(out).all()
    assert_close(out, torch.tensor([0.0, 255 * 1e-8]), atol=0, rtol=1e-6)


def test_ste_gradient_of_x_is_one_inside_zero_outside():
    scale, zp = torch.tensor(0.1), torch.tensor(3.0)  # range [-0.3, 1.2] at 4 bits
    x = torch.tensor([-5.0, -0.31, -0.2, 0.0, 0.444, 1.19, 1.3, 9.0], requires_grad=True)
    fake_quant(x, scale, zp, 0, 15, 1.0).sum().backward()
    inside = (torch.round(x / scale) + 3 >= 0) & (torch.round(x / scale) + 3 <= 15)
    assert_close(x.grad, inside.float(), atol=0, rtol=0)
    assert inside.tolist() == [False, True, True, True, True, True, False, False]


def test_lsq_gradients_of_scale_and_zero_point():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, generator=g)
    qmin, qmax, gs = 0, 15, lsq_grad_scale(200, 15)
    scale = torch.tensor(0.08, requires_grad=True)
    zp = torch.tensor(6.0, requires_grad=True)
    fake_quant(x, scale, zp, qmin, qmax, gs).sum().backward()

    v = x / 0.08
    q = torch.round(v) + 6
    below, above = q < qmin, q > qmax
    inside = ~(below | above)
    assert below.any() and above.any() and inside.any()
    # analytic LSQ: (round(v) - v) inside, qmin - z below, qmax - z above; times the gradient scale
    d_scale = torch.where(inside, torch.round(v) - v, torch.where(below, qmin - 6.0, qmax - 6.0))
    assert_close(scale.grad, d_scale.sum() * gs)
    d_zp = torch.where(inside, torch.zeros_like(v), torch.full_like(v, -0.08))
    assert_close(zp.grad, d_zp.sum() * gs)
    assert gs == pytest.approx(1 / (200 * 15) ** 0.5)


def test_clip_first_takes_lsq_gradients_by_the_unrounded_value():
    # LSQ (Esser et al. 2020) clamps v = x/Δ + z to the grid before rounding: its gradients are those of
    # round(clamp(v)), so the grid test is on v itself, where the default tests round(v) (half a step wider)
    g = torch.Generator().manual_seed(2)
    edges = torch.tensor([-0.51, -0.49, 0.26, 0.27])  # x/Δ + z = -0.2, 0.2, 15.2, 15.4
    x = torch.cat([torch.randn(300, generator=g), edges])
    qmin, qmax, gs = 0, 15, lsq_grad_scale(304, 15)
    grads = {}
    for clip_first in (False, True):
        xx = x.clone().requires_grad_()
        scale = torch.tensor(0.05, requires_grad=True)
        zp = torch.tensor(10.0, requires_grad=True)
        out = fake_quant(xx, scale, zp, qmin, qmax, gs, clip_first=clip_first)
        out.sum().backward()
        grads[clip_first] = out.detach(), xx.grad, scale.grad, zp.grad
    assert torch.equal(grads[True][0], grads[False][0])  # the same values either way

    v = x / 0.05 + 10.0
    below, above = v < qmin, v > qmax
    inside = ~(below | above)
    half_step_out = inside.logical_not() & (torch.round(v) >= qmin) & (torch.round(v) <= qmax)
    assert half_step_out.sum() >= 3  # values the two orders treat differently (v in (-0.5, 0) or (15, 15.5))
    _, x_grad, scale_grad, zp_grad = grads[True]
    assert_close(x_grad, inside.float(), atol=0, rtol=0)
    d_scale = torch.where(inside, torch.round(v) - v, torch.where(below, qmin - 10.0, qmax - 10.0))
    assert_close(scale_grad, d_scale.sum() * gs)
    assert_close(zp_grad, torch.where(inside, 0.0, -0.05).sum() * gs)
    assert not torch.equal(grads[False][1], x_grad)  # the default passes gradient in the half step beyond


def test_clip_first_reaches_every_quantizer_of_a_spec():
    spec = QuantSpec(weight_bits=4, act_bits=4, clip_first=True)
    assert spec.weight_spec("a").clip_first and spec.act_spec("a").clip_first and spec.prob_spec("a").clip_first
    assert not QuantSpec().act_spec("a").clip_first
    w = torch.tensor([[-1.0, -0.2, 0.1, 1.0]])
    expected = {False: [0.0, 1.0, 1.0, 1.0], True: [0.0, 1.0, 1.0, 0.0]}
    for clip_first in (False, True):
        q = UniformQuantizer(QuantizerSpec(4, clip_first=clip_first), 1)
        q.init_from(w)
        with torch.no_grad():  # x/Δ + z = -1.33, 5.33, 7.83, 15.33: the last lies within half a step above the grid
            q.scale.fill_(0.12)
            q.zero_point.fill_(7.0)
        ww = w.clone().requires_grad_()
        q(ww).sum().backward()
        assert ww.grad[0].tolist() == expected[clip_first]
    with pytest.raises(ValueError, match="clip_first='yes' is invalid: must be a bool"):
        QuantSpec(clip_first="yes")


# ---- UniformQuantizer --------------------------------------------------------------------------------------------
def test_uniform_per_channel_minmax_init_and_forward():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(6, 3, 3, 3, generator=g)
    w[0] = w[0].abs() + 0.1  # an all-positive row: its range is widened to include 0
    q = UniformQuantizer(QuantizerSpec(4, granularity="channel"), num_channels=6)
    q.init_from(w)
    rows = w.reshape(6, -1)
    scale, zp = ref_minmax(rows.amin(1), rows.amax(1), 4)
    assert_close(q.scale.detach(), scale, atol=0, rtol=0)
    assert_close(q.zero_point.detach(), zp, atol=0, rtol=0)
    assert q.zero_point[0] == 0
    out = q(w)
    assert_close(out, ref_quant(w, scale.view(6, 1, 1, 1), zp.view(6, 1, 1, 1), 0, 15), atol=0, rtol=0)
    # every row keeps its range: 16 levels, the extremes representable up to half a step
    assert ((out - w).abs() <= scale.view(6, 1, 1, 1) / 2 + 1e-6).all()
    assert isinstance(q.scale, torch.nn.Parameter) and isinstance(q.zero_point, torch.nn.Parameter)


def test_uniform_per_tensor_and_not_learnable():
    w = torch.linspace(-1, 3, 40).reshape(4, 10)
    q = UniformQuantizer(QuantizerSpec(8, granularity="tensor", learnable=False), num_channels=4)
    q.init_from(w)
    assert q.scale.shape == (1,)
    assert "scale" in dict(q.named_buffers()) and not list(q.parameters())
    scale, zp = ref_minmax(w.min(), w.max(), 8)
    assert_close(q(w), ref_quant(w, scale, zp, 0, 255), atol=0, rtol=0)


def test_uniform_symmetric():
    w = torch.tensor([[-2.0, 0.3, 1.0, 0.05], [0.5, -0.25, 0.1, 0.0]])
    q = UniformQuantizer(QuantizerSpec(4, symmetric=True, granularity="channel"), num_channels=2)
    q.init_from(w)
    assert (q.qmin, q.qmax) == (-8, 7)
    assert "zero_point" in dict(q.named_buffers())  # z is fixed at 0 when symmetric
    assert_close(q.zero_point, torch.zeros(2), atol=0, rtol=0)
    scale = torch.tensor([2.0, 0.5]) / 7
    assert_close(q.scale.detach(), scale, atol=0, rtol=0)
    out = q(w)
    assert_close(out, scale[:, None] * torch.clamp(torch.round(w / scale[:, None]), -8, 7), atol=0, rtol=0)
    levels = out / scale[:, None]
    assert levels.round().min() >= -8 and levels.round().max() <= 7


def test_lsq_init_is_two_mean_abs_over_sqrt_qp_per_row():
    w = torch.tensor([[-2.0, 0.3, 1.0, 0.05], [0.5, -0.25, 0.1, 0.0]])
    q = UniformQuantizer(QuantizerSpec(4, symmetric=True, granularity="channel", init="lsq"), num_channels=2)
    q.init_from(w)
    # Esser et al. 2020: s = 2 <|v|> / sqrt(Q_P), Q_P = 7 at 4 bits; rows' mean |w| are 3.35 / 4 and 0.85 / 4
    scale = torch.tensor([2 * 3.35 / 4, 2 * 0.85 / 4]) / 7**0.5
    assert_close(q.scale.detach(), scale)
    assert_close(q.zero_point, torch.zeros(2), atol=0, rtol=0)
    assert_close(q(w), scale[:, None] * torch.clamp(torch.round(w / scale[:, None]), -8, 7))
    q = UniformQuantizer(QuantizerSpec(8, symmetric=True, granularity="tensor", init="lsq"), num_channels=2)
    q.init_from(w)
    assert_close(q.scale.detach(), torch.tensor([2 * 4.2 / 8 / 127**0.5]))
    assert (UniformQuantizer(QuantizerSpec(4, True, "channel", "lsq"), 2).scale == 1).all()  # untouched until init


def test_lsq_init_is_refused_where_it_does_not_apply():
    with pytest.raises(ValueError, match=r"init='lsq' is for a symmetric grid .*set symmetric=True \(in a config"):
        QuantizerSpec(4, symmetric=False, init="lsq")
    with pytest.raises(ValueError, match="weight_init='lsq' is for a symmetric grid .*set weight_symmetric=true"):
        QuantSpec(weight_init="lsq")
    assert QuantSpec(weight_init="lsq", weight_symmetric=True).weight_spec("conv1").init == "lsq"
    with pytest.raises(ValueError, match="act_init='lsq' is invalid: allowed values are 'minmax', 'mse'"):
        QuantSpec(act_init="lsq", act_symmetric=True)
    with pytest.raises(ValueError, match="init='lsq' is invalid for TemporalQuantizer: allowed minmax, mse"):
        TemporalQuantizer(QuantizerSpec(8, symmetric=True, init="lsq"))


def test_mse_init_is_never_worse_than_minmax():
    g = torch.Generator().manual_seed(3)
    u = torch.rand(8, 1024, generator=g) - 0.5
    w = -torch.sign(u) * torch.log1p(-2 * u.abs())  # Laplace: heavy tails, clipping pays off
    err = {}
    for init in ("minmax", "mse"):
        q = UniformQuantizer(QuantizerSpec(4, granularity="channel", init=init), num_channels=8)
        q.init_from(w)
        err[init] = (q(w) - w).pow(2).sum(1)
    assert (err["mse"] <= err["minmax"]).all()
    assert err["mse"].sum() < 0.8 * err["minmax"].sum()


def test_uniform_disabled_is_identity_and_uninitialised_raises():
    w = torch.randn(3, 4)
    q = UniformQuantizer(QuantizerSpec(4, granularity="channel"), num_channels=3)
    with pytest.raises(RuntimeError, match="not initialised"):
        q(w)
    q.enabled = False
    assert q(w) is w


def test_initialized_flag_travels_in_state_dict():
    q = UniformQuantizer(QuantizerSpec(4, granularity="channel"), num_channels=3)
    q.init_from(torch.randn(3, 4))
    fresh = UniformQuantizer(QuantizerSpec(4, granularity="channel"), num_channels=3)
    fresh.load_state_dict(q.state_dict())
    assert fresh.initialized
    assert_close(fresh.scale, q.scale, atol=0, rtol=0)


# ---- TemporalQuantizer -------------------------------------------------------------------------------------------
def _temporal(num_steps: int, bits: int = 4, init: str = "minmax") -> tuple[TemporalQuantizer, StepContext]:
    ctx = StepContext()
    return TemporalQuantizer(QuantizerSpec(bits, init=init), ctx, num_steps=num_steps), ctx


@pytest.mark.parametrize("shape", [(4, 6), (4, 5, 6), (4, 3, 5, 5)])
def test_temporal_per_sample_step_indexing(shape):
    q, ctx = _temporal(3)
    scales, zps = torch.tensor([0.1, 0.02, 0.3]), torch.tensor([3.0, 9.0, 0.0])
    with torch.no_grad():
        q.scale.copy_(scales)
        q.zero_point.copy_(zps)
    q.initialized = True
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    ctx.index = torch.tensor([2, 0, 1, 0])  # mixed steps in one batch
    out = q(x)
    for b, i in enumerate(ctx.index.tolist()):
        assert_close(out[b], ref_quant(x[b], scales[i], zps[i], 0, 15), atol=0, rtol=0)


@pytest.mark.parametrize("num_steps", [1, 3])
def test_inference_path_is_bit_identical_to_autograd_path(num_steps):
    q, ctx = _temporal(num_steps, bits=6)
    with torch.no_grad():
        q.scale.copy_(torch.tensor([0.05, 0.013, 0.2])[:num_steps])
        q.zero_point.copy_(torch.tensor([30.4, 9.0, 0.0])[:num_steps])
    q.initialized = True
    x = torch.randn(8, 4, 6, 6, generator=torch.Generator().manual_seed(5)) * 2
    ctx.index = torch.tensor([2, 0, 1, 0, 1, 1, 2, 0]) % num_steps
    with_grad = q(x.requires_grad_())  # fake_quant with STE / LSQ
    with torch.no_grad():
        fast = q(x.detach())  # the in-place sampling chain
        own = x.detach().clone()
        assert q(own, inplace=True) is own  # written into the caller's tensor
    assert_close(fast, with_grad.detach(), atol=0, rtol=0)
    assert_close(own, fast, atol=0, rtol=0)
    assert_close(q(x.detach().clone().requires_grad_(), inplace=True), with_grad, atol=0, rtol=0)  # ignored: autograd
    z = q.zero_point.detach().round()[ctx.index]
    for b, i in enumerate(ctx.index.tolist()):
        assert_close(fast[b], ref_quant(x[b].detach(), q.scale[i].detach(), z[b], 0, 63), atol=0, rtol=0)


def test_qdrop_leaves_a_share_of_elements_unquantized_only_while_training():
    q, ctx = _temporal(2, bits=4)
    with torch.no_grad():
        q.scale.copy_(torch.tensor([0.1, 0.3]))
        q.zero_point.copy_(torch.tensor([8.0, 3.0]))
    q.initialized = True
    x = torch.randn(8, 50, 50, generator=torch.Generator().manual_seed(6)).requires_grad_()
    ctx.index = torch.tensor([0, 1] * 4)
    quantized = torch.stack([ref_quant(x[b].detach(), q.scale[i].detach(), q.zero_point[i].detach(), 0, 15)
                             for b, i in enumerate(ctx.index.tolist())])  # fmt: skip
    ctx.drop_prob, ctx.generator = 0.3, torch.Generator().manual_seed(1)
    out = q(x)
    kept_fp = out.detach() == x.detach()
    assert torch.equal(out.detach()[~kept_fp], quantized[~kept_fp])  # every other element is the quantized value
    assert abs(kept_fp.float().mean().item() - 0.3) < 0.02  # 20,000 elements; off-grid x is never its own quantum
    out.sum().backward()  # dropped elements pass the gradient straight to x (identity), kept ones through the STE
    assert (x.grad[kept_fp] == 1).all() and q.scale.grad is not None
    ctx.generator = torch.Generator().manual_seed(1)
    assert torch.equal(q(x).detach(), out.detach())  # the same generator state draws the same mask
    with torch.no_grad():  # sampling and evaluation always quantize
        assert torch.equal(q(x), quantized)
    ctx.drop_prob = 0.0
    assert torch.equal(q(x).detach(), quantized)


def test_temporal_gradients_reach_each_sample_step():
    q, ctx = _temporal(3)
    with torch.no_grad():
        q.scale.copy_(torch.tensor([0.1, 0.2, 0.3]))
    q.initialized = True
    ctx.index = torch.tensor([0, 0, 2])
    q(torch.randn(3, 8) * 2).sum().backward()
    assert q.scale.grad[0] != 0 and q.scale.grad[2] != 0 and q.scale.grad[1] == 0


def test_temporal_needs_step_index():
    q, ctx = _temporal(3)
    q.initialized = True
    with pytest.raises(RuntimeError, match="has 3 steps but no step index is set"):
        q(torch.randn(2, 4))
    ctx.index = torch.tensor([0, 1, 2])
    with pytest.raises(RuntimeError, match=r"step index has shape \(3,\) but the input batch has 2 samples"):
        q(torch.randn(2, 4))


def test_shared_quantizer_ignores_index_and_expand_steps_repeats():
    q, ctx = _temporal(1)
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        q.scale.fill_(0.05)
        q.zero_point.fill_(4.0)
    q.initialized = True
    shared = q(x)
    assert_close(shared, ref_quant(x, torch.tensor(0.05), torch.tensor(4.0), 0, 15), atol=0, rtol=0)
    q.expand_steps(5)
    assert q.num_steps == 5 and q.scale.shape == (5,) and isinstance(q.scale, torch.nn.Parameter)
    assert_close(q.scale.detach(), torch.full((5,), 0.05), atol=0, rtol=0)
    ctx.index = torch.tensor([4, 0, 2, 3])
    assert_close(q(x), shared, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"only a shared quantizer \(num_steps=1\) can be expanded; this one has 5"):
        q.expand_steps(7)


def test_temporal_observation_per_step_minmax():
    q, ctx = _temporal(4)
    q.start_observation()
    # step 0 sees [-1, 2], step 1 sees [-3, 0.5], steps 2, 3 are never observed
    x = torch.tensor([[-1.0, 2.0], [-3.0, 0.5], [0.0, 1.0]])
    ctx.index = torch.tensor([0, 1, 0])
    assert q(x) is x  # observing passes inputs through
    assert q.finish_observation()
    assert q.initialized and not q.observing
    scale, zp = ref_minmax(torch.tensor([-1.0, -3.0, -3.0, -3.0]), torch.tensor([2.0, 0.5, 2.0, 2.0]), 4)
    assert_close(q.scale.detach(), scale, atol=0, rtol=0)
    assert_close(q.zero_point.detach(), zp, atol=0, rtol=0)


@pytest.mark.parametrize("init", ["minmax", "mse"])
def test_pooled_observation_starts_every_step_from_all_steps_together(init):
    """TPQ's `init: shared` (EfficientDM's TALSQ start): every step gets the pair of all observed values."""
    q, ctx = _temporal(3, init=init)
    q.start_observation()
    x = torch.tensor([[-1.0, 2.0, 0.3], [-3.0, 0.5, 0.1], [0.0, 1.0, 4.0]])
    ctx.index = torch.tensor([0, 1, 0])  # step 2 is never observed
    q(x)
    everything = torch.cat([x[0], x[2], x[1]])  # the values of step 0, then of step 1
    assert q.finish_observation(pooled=True)
    if init == "minmax":
        scale, zp = ref_minmax(torch.tensor(-3.0), torch.tensor(4.0), 4)
    else:
        scale, zp = (v[0] for v in mse_search(everything[None], 0, 15, False))
    assert torch.equal(q.scale.detach(), scale.expand(3)) and torch.equal(q.zero_point.detach(), zp.expand(3))


def test_temporal_mse_observation_keeps_each_steps_values_in_batch_order():
    q, ctx = _temporal(3, init="mse")
    q.start_observation()
    x1, x2 = torch.arange(12.0).reshape(3, 2, 2), -torch.arange(8.0).reshape(2, 2, 2)
    ctx.index = torch.tensor([2, 0, 2])
    q(x1)
    ctx.index = torch.tensor([0, 2])
    q(x2)
    assert torch.equal(q._obs_samples[0], torch.cat([x1[1].flatten(), x2[0].flatten()]))
    assert q._obs_samples[1] is None  # never observed
    assert torch.equal(q._obs_samples[2], torch.cat([x1[0].flatten(), x1[2].flatten(), x2[1].flatten()]))
    assert torch.equal(q._obs_min, torch.tensor([-3.0, float("inf"), -7.0]))
    assert torch.equal(q._obs_max, torch.tensor([7.0, float("-inf"), 11.0]))
    pooled = torch.cat([q._obs_samples[0], q._obs_samples[2]])
    assert q.finish_observation()
    pooled_scale, _ = mse_search(pooled[None], 0, 15, False)
    assert torch.equal(q.scale.detach()[1], pooled_scale[0])  # the unseen step takes the pooled search


def test_temporal_mse_observation_keeps_a_sample_of_every_batch_in_proportion():
    """Past OBSERVE_SAMPLES values a step's kept values stand for all it observed: each batch gives its share, and
    no value is kept twice. (Keeping OBSERVE_SAMPLES of kept + new, as dq did, left the first of these batches 16 %
    of the values and the last 31 %, not 20 % each: MSE ranges fitted the last calibration batches.)"""
    q, ctx = _temporal(2, init="mse")
    q.start_observation()
    sizes = (30_000, 20_000, 40_000, 30_000, 30_000)  # step 0's batches; values unique, tagged by batch (j * 1e6 + i)
    for j, n in enumerate(sizes):
        ctx.index = torch.tensor([0, 1])
        q(torch.stack([j * 1e6 + torch.arange(float(n)), torch.zeros(n)]))  # step 1 sees zeros
    kept = q._obs_samples[0]
    assert kept.numel() == OBSERVE_SAMPLES and kept.unique().numel() == OBSERVE_SAMPLES  # without replacement
    share = [int(((kept >= j * 1e6) & (kept < j * 1e6 + n)).sum()) for j, n in enumerate(sizes)]
    assert sum(share) == OBSERVE_SAMPLES
    for n, got in zip(sizes, share, strict=True):
        assert abs(got - OBSERVE_SAMPLES * n / sum(sizes)) < 300, share  # 300: some 3 sd of the random split
    assert q._obs_counts == [sum(sizes), sum(sizes)]


def test_stratified_subsample_matches_a_plain_allocation():
    g = torch.Generator().manual_seed(0)
    a, b = torch.arange(10.0), 100 + torch.arange(8.0)  # a stands for 30 values, b holds all of its 8
    got = stratified_subsample([(a, 30), (b, 8)], 7, g)
    # quotas 7 * 30/38 = 5.53 and 7 * 8/38 = 1.47: floors 5 + 1, the leftover to the larger fractional part (a)
    assert int((got < 100).sum()) == 6 and int((got >= 100).sum()) == 1
    assert torch.equal(stratified_subsample([(a, 30), (b, 8)], 18, g), torch.cat([a, b]))  # all fit: nothing drawn
    ref = torch.Generator().manual_seed(1)
    want = torch.cat([a[torch.randperm(10, generator=ref)[:6]], b[torch.randperm(8, generator=ref)[:1]]])
    assert torch.equal(stratified_subsample([(a, 30), (b, 8)], 7, torch.Generator().manual_seed(1)), want)


def test_pooled_mse_start_weighs_each_step_by_what_it_observed():
    """Steps never observed start from all observed values together, each step weighted by its count."""
    q, ctx = _temporal(3, init="mse")
    q.start_observation()
    ctx.index = torch.tensor([0, 0, 0, 1])
    q(torch.cat([torch.rand(3, 40_000), 100 + torch.rand(1, 40_000)]))  # step 0: 120,000 values; step 1: 40,000
    pooled = stratified_subsample(
        [(q._obs_samples[0], 120_000), (q._obs_samples[1], 40_000)], OBSERVE_SAMPLES, torch.Generator().manual_seed(0)
    )
    assert abs(float((pooled >= 100).float().mean()) - 0.25) < 1e-4
    q._obs_gen = torch.Generator().manual_seed(0)  # the draw above, with the generator state it will have
    assert q.finish_observation()
    scale, zp = mse_search(pooled[None], 0, 15, False)
    assert torch.equal(q.scale.detach()[2], scale[0]) and torch.equal(q.zero_point.detach()[2], zp[0])


def test_temporal_observation_refuses_a_step_index_out_of_range():
    q, ctx = _temporal(3)
    q.start_observation()
    ctx.index = torch.tensor([0, 3])
    with pytest.raises(IndexError, match=r"step indices span \[0, 3\], out of range for a quantizer with 3 steps"):
        q(torch.randn(2, 4))


def test_temporal_observation_without_input_stays_uninitialised():
    q, _ = _temporal(1)
    q.start_observation()
    assert q.finish_observation() is False
    assert not q.initialized


def test_temporal_mse_observation_beats_minmax_and_caps_samples():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 40_000, generator=g)
    x[:, :5] = 30.0  # outliers
    err = {}
    for init in ("minmax", "mse"):
        q, _ = _temporal(1, bits=4, init=init)
        q.start_observation()
        q(x)
        q(x)
        if init == "mse":
            assert q._obs_samples[0].numel() == OBSERVE_SAMPLES
        q.finish_observation()
        err[init] = (q(x) - x).pow(2).sum()
    assert err["mse"] < 0.5 * err["minmax"]


def test_temporal_uninitialised_raises_and_disabled_is_identity():
    q, _ = _temporal(1)
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="activation quantizer is not initialised"):
        q(x)
    q.enabled = False
    assert q(x) is x


# ---- specs -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [0, 1, 17])
def test_spec_rejects_bits_out_of_range(bits):
    with pytest.raises(ValueError) as e:
        QuantSpec(weight_bits=bits)
    assert str(e.value) == f"weight_bits={bits} is out of range: bits must be an integer in [2, 16]"
    with pytest.raises(ValueError, match=rf"^bits={bits} is out of range: bits must be an integer in \[2, 16\]$"):
        QuantizerSpec(bits)


def test_spec_rejects_non_integer_bits():
    with pytest.raises(ValueError, match=r"act_bits=4.0 is not an integer: bits must be an integer in \[2, 16\]"):
        QuantSpec(act_bits=4.0)
    with pytest.raises(ValueError, match="attn_prob_bits=True is not an integer"):
        QuantSpec(attn_prob_bits=True)


def test_spec_rejects_unknown_choices():
    with pytest.raises(ValueError) as e:
        QuantSpec(weight_granularity="row")
    assert str(e.value) == "weight_granularity='row' is invalid: allowed values are 'tensor', 'channel'"
    with pytest.raises(ValueError, match="granularity='group' is invalid: allowed values are 'tensor', 'channel'"):
        QuantizerSpec(4, granularity="group")
    with pytest.raises(ValueError, match="act_init='percentile' is invalid: allowed values are 'minmax', 'mse'"):
        QuantSpec(act_init="percentile")
    with pytest.raises(ValueError, match="act_granularity='channel' is invalid: allowed values are 'tensor'"):
        QuantSpec(act_granularity="channel")
    with pytest.raises(ValueError, match="weight_symmetric='yes' is invalid: must be a bool"):
        QuantSpec(weight_symmetric="yes")


def test_spec_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError) as e:
        QuantSpec.from_dict({"weight_bits": 4, "wbits": 4})
    msg = str(e.value)
    assert msg.startswith("unknown QuantSpec key(s) ['wbits']; allowed keys are ['weight_bits', 'act_bits'")
    assert "'quantize_attention'" in msg


def test_spec_round_trip_and_per_layer_specs():
    spec = QuantSpec(weight_bits=4, act_bits=6, weight_init="mse", keep_8bit=("conv_in", "time_embedding"))
    assert spec.keep_8bit == ["conv_in", "time_embedding"]
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    assert spec.weight_spec("conv_in") == QuantizerSpec(8, False, "channel", "mse", True)
    assert spec.act_spec("conv_in").bits == 8
    assert spec.weight_spec("time_embedding.linear_1").bits == 8  # below a listed prefix
    assert spec.weight_spec("conv_in_extra").bits == 4  # a prefix must end at a dot
    assert spec.weight_spec("down_blocks.0.resnets.0.conv1") == QuantizerSpec(4, False, "channel", "mse", True)
    assert spec.act_spec("down_blocks.0.resnets.0.conv1") == QuantizerSpec(6, False, "tensor", "minmax", True)
    assert spec.prob_spec("mid_block.attentions.0") == QuantizerSpec(8, False, "tensor", "minmax", True)
    globbed = QuantSpec(weight_bits=4, act_bits=4, keep_8bit=["*.conv_shortcut"])  # a glob matches whole names
    assert globbed.weight_spec("up_blocks.0.resnets.1.conv_shortcut").bits == 8
    assert globbed.act_spec("down_blocks.1.resnets.0.conv_shortcut").bits == 8
    assert globbed.act_spec("down_blocks.1.resnets.0.conv1").bits == 4
    assert globbed.act_spec("conv_shortcut_extra.conv").bits == 4
    assert QuantizerSpec.from_dict(QuantizerSpec(5, True).to_dict()) == QuantizerSpec(5, True)
