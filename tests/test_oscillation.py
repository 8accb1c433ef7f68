"""Oscillation tracking and dampening (Nagel et al. 2022) against plain references, and in BKD."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDIMScheduler
from torch import nn

from dq.distill import BlockwiseDistillation
from dq.distill.calibration import build_calibration_set
from dq.distill.oscillation import OscillationTracker, dampening_loss, trained_weight_layers
from dq.quant import QuantConv2d, QuantizerSpec, QuantLinear, QuantSpec, UniformQuantizer, quantize_model

pytestmark = pytest.mark.usefixtures("one_thread")


def linear(weight: torch.Tensor, bits: int = 4) -> QuantLinear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data.copy_(weight)
    spec = QuantizerSpec(bits=bits, symmetric=False, granularity="channel", init="minmax")
    return QuantLinear.from_float(layer, spec, QuantizerSpec(bits=8))


def test_codes_are_the_forward_pass_grid_codes() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 3, 3, 3, generator=g)
    q = UniformQuantizer(QuantizerSpec(bits=4, symmetric=False, granularity="channel", init="minmax"), 6)
    q.init_from(w)
    with torch.no_grad():
        q.zero_point.add_(0.3)  # a zero-point between integers: codes use round(z), as the forward pass does
        w[0, 0, 0, 0] = 100.0  # clipped to the top of the grid
    codes = q.codes(w)
    assert codes.min() >= q.qmin and codes.max() <= q.qmax and torch.equal(codes, codes.round())
    assert codes[0, 0, 0, 0] == q.qmax
    z = q.zero_point.detach().round().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(q.scale.detach().reshape(-1, 1, 1, 1) * (codes - z), q(w).detach())


def test_dampening_loss_is_the_squared_distance_to_the_bin_centre_in_steps() -> None:
    layer = linear(torch.tensor([[0.0, 1.5], [-1.0, 1.0]]))  # rows span [0, 1.5] and [-1, 1]: steps 0.1 and 2/15
    wq = layer.weight_quantizer
    step = wq.scale.detach().clone()
    z = wq.zero_point.detach().round()
    with torch.no_grad():  # row 0: on the grid, a quarter step off, at an edge, beyond the range (clipped)
        layer.weight.data = torch.tensor([[0.0 - z[0] * step[0] + 3 * step[0], 0.25 * step[0]],
                                          [2.5 * step[1] - z[1] * step[1], 50.0]])  # fmt: skip
    # plain reference: distance of each weight (clamped into the range) to the nearest grid point, in steps
    ref = []
    for r in range(2):
        lo, hi = step[r] * (wq.qmin - z[r]), step[r] * (wq.qmax - z[r])
        for v in layer.weight.detach()[r]:
            c = min(max(float(v), float(lo)), float(hi))
            ref.append(((c - round(c / float(step[r])) * float(step[r])) / float(step[r])) ** 2)
    loss = dampening_loss([layer])
    assert loss.item() == pytest.approx(sum(ref) / 4, rel=1e-5, abs=1e-9)
    assert ref[1] == pytest.approx(1 / 16) and ref[2] == pytest.approx(1 / 4) and ref[3] == pytest.approx(0, abs=1e-9)
    loss.backward()
    assert wq.scale.grad is None and wq.zero_point.grad is None  # the grid is a constant of the term
    assert layer.weight.grad[0, 1] > 0  # a quarter step above its centre: descent moves it down, to the centre
    assert layer.weight.grad[1, 1] == 0  # clipped: left alone


def test_dampening_loss_needs_a_layer() -> None:
    with pytest.raises(ValueError, match="no quantized layer"):
        dampening_loss([])


def test_tracker_counts_reversals_not_monotone_moves() -> None:
    layer = linear(torch.tensor([[-1.5, 0.0, 1.5]]))
    wq = layer.weight_quantizer
    step = wq.scale.detach()[0]
    start = step * (torch.tensor([[5.0, 7.0, 9.0]]) - wq.zero_point.detach().round())  # grid points inside the range
    with torch.no_grad():
        layer.weight.copy_(start)
    tracker = OscillationTracker([layer])
    moves = [(1.0, 1.0, 0.0), (0.0, 2.0, 0.1), (1.0, 3.0, 0.2), (1.0, 3.0, -0.1)]  # in steps, from the start
    for m in moves:  # weight 0 goes up, down, up (2 reversals); weight 1 climbs; weight 2 stays in its bin
        with torch.no_grad():
            layer.weight.copy_(start + step * torch.tensor([m]))
        tracker.update()
    codes = [[round(float(v)) for v in torch.tensor([[0.0, 0.0, 0.0], *moves])[:, j]] for j in range(3)]
    changes = [sum(a != b for a, b in zip(c, c[1:], strict=False)) for c in codes]
    assert tracker.flips() == pytest.approx(sum(changes) / 3)
    assert tracker.share() == pytest.approx(1 / 3)  # only weight 0 reversed its direction


def test_freezing_holds_a_weight_that_keeps_oscillating_at_its_average_code() -> None:
    layer = linear(torch.tensor([[-1.5, 0.0, 1.5]]))
    wq = layer.weight_quantizer
    step, z = wq.scale.detach()[0], wq.zero_point.detach().round()[0]
    with torch.no_grad():
        layer.weight.copy_(step * (torch.tensor([[5.0, 3.0, 9.0]]) - z))
    tracker = OscillationTracker([layer], freeze_threshold=0.6, momentum=0.5)
    # weight 0 flips between codes 5 and 6 every step; weight 1 climbs one code per step; weight 2 stays at code 9
    for i in range(1, 7):
        with torch.no_grad():
            layer.weight.copy_(step * (torch.tensor([[5.0 + i % 2, 3.0 + i, 9.0]]) - z))
        tracker.update()
    frozen = tracker.frozen_share()
    assert frozen == pytest.approx(1 / 3)  # weight 0 only
    # plain reference of the moving averages: weight 0's frequency is 0.5 after its first reversal (step 2) and 0.75
    # after its second (step 3), where it passes 0.6; its average code then is 0.25 * 5 + 0.25 * 6 + 0.5 * 5 = 5.25
    # (codes 5, 6, 5 of the start and steps 1, 2), so it is frozen at code 5 while steps 4-6 move it to 6, 5, 6
    codes = wq.codes(layer.weight.detach())[0]
    assert codes.tolist() == [5.0, 9.0, 9.0]
    with torch.no_grad():  # an optimizer step moves weight 0 two codes up: the next update puts it back
        layer.weight[0, 0] += 2 * step
    tracker.update()
    assert wq.codes(layer.weight.detach())[0, 0] == 5.0
    torch.testing.assert_close(layer.weight.detach()[0, 0], step * (5.0 - z))


@pytest.fixture(scope="module")
def calib(teacher):
    return build_calibration_set(teacher, DDIMScheduler(num_train_timesteps=1000), 16, 3, (1, 8, 8), 0, progress=False)


def bin_distance(student: nn.Module) -> float:
    """Mean squared distance of every 4-bit latent weight to its bin centre, in steps (from each layer's
    dampening_loss, which test_dampening_loss_is_the_squared_distance_to_the_bin_centre_in_steps checks by hand)."""
    total, n = 0.0, 0
    for m in student.modules():
        if isinstance(m, QuantConv2d | QuantLinear) and m.weight_quantizer.bits == 4:
            total += dampening_loss([m.requires_grad_(True)]).item() * m.weight.numel()
            n += m.weight.numel()
    return total / n


def test_bkd_dampening_pulls_latent_weights_to_their_bin_centres(teacher, calib) -> None:
    import pytorch_lightning as pl

    distances, histories = [], []
    for dampen in (0.0, 1e4):
        student = copy.deepcopy(teacher)
        quantize_model(student, QuantSpec(weight_bits=4, act_bits=8), calib.table)
        module = BlockwiseDistillation(teacher, student, calib, iters_per_block=6, batch_size=8, calib_batch_size=8,
                                       progress=False, lr_weight=1e-2, lr_weight_qparams=1e-4, lr_act_qparams=1e-4,
                                       revert_worse=False, dampen=dampen)  # fmt: skip
        pl.Trainer(accelerator="cpu", max_steps=module.max_steps, max_epochs=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False).fit(module)  # fmt: skip
        distances.append(bin_distance(module.student))
        histories.append(module.history)
    assert distances[1] < 0.5 * distances[0]
    for h in histories[0]:
        assert 0.0 <= h["oscillated"] <= 1.0
    assert any(h["oscillated"] > 0 for h in histories[0])  # lr 1e-2 is a quarter of a 4-bit step: codes flip


def test_bkd_freezing_freezes_oscillating_weights(teacher, calib) -> None:
    import pytorch_lightning as pl

    student = copy.deepcopy(teacher)
    quantize_model(student, QuantSpec(weight_bits=4, act_bits=8), calib.table)
    module = BlockwiseDistillation(teacher, student, calib, iters_per_block=8, batch_size=8, calib_batch_size=8,
                                   progress=False, lr_weight=3e-2, lr_weight_qparams=1e-4, lr_act_qparams=1e-4,
                                   revert_worse=False, freeze=0.015)  # fmt: skip
    pl.Trainer(accelerator="cpu", max_steps=module.max_steps, max_epochs=1, logger=False, enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False).fit(module)  # fmt: skip
    frozen = [h["frozen"] for h in module.history]
    assert all(0 <= f <= h["oscillated"] for f, h in zip(frozen, module.history, strict=True))
    assert max(frozen) > 0


def test_trained_weight_layers_are_the_trained_weights_on_an_active_grid() -> None:
    trained, frozen, off = (linear(torch.randn(3, 4)) for _ in range(3))
    frozen.weight.requires_grad_(False)
    off.weight_quantizer.enabled = False
    parent = nn.Sequential(trained, frozen, off)
    assert trained_weight_layers([parent, trained]) == [trained]  # deduplicated
