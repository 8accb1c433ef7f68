"""experiments/layer_input_sqnr.py: its rotation, per-step rounding and bias share against plain references."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import REPO

from dq.quant.quantizer import fake_quant_, mse_search

spec = importlib.util.spec_from_file_location("layer_input_sqnr", REPO / "experiments" / "layer_input_sqnr.py")
lis = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lis)


@pytest.mark.parametrize("n", [1, 16, 48])
def test_rotation_is_orthonormal(n: int) -> None:
    h = lis.rotation(n)
    torch.testing.assert_close(h @ h.T, torch.eye(n), atol=1e-5, rtol=0)
    if n == 16:  # Hadamard: every entry is ±1/sqrt(n)
        torch.testing.assert_close(h.abs(), torch.full((n, n), 0.25))


def test_rounding_is_per_step_and_per_part() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 6, 3, 3, generator=g) * torch.tensor([1.0, 1, 1, 1, 10, 10])[:, None, None]
    steps = torch.tensor([0, 1, 2] * 4)
    parts = [(0, 4), (4, 6)]
    out = lis.rounded_input(x, steps, parts, 4, rotate=False)
    for i in range(3):  # the reference: one MSE-searched (Δ, z) per step and part, applied by hand
        for a, b in parts:
            v = x[steps == i, a:b]
            scale, zp = mse_search(v.reshape(1, -1), 0, 15, symmetric=False)
            ref = fake_quant_(v.reshape(1, -1).clone(), scale[:, None], zp[:, None], 0, 15).reshape(v.shape)
            torch.testing.assert_close(out[steps == i, a:b], ref)
            assert len(out[steps == i, a:b].unique()) <= 16


def test_rotated_rounding_is_close_to_input_and_differs_from_plain() -> None:
    x = torch.randn(8, 16, 2, 2, generator=torch.Generator().manual_seed(1))
    steps = torch.zeros(8, dtype=torch.long)
    rotated = lis.rounded_input(x, steps, [(0, 16)], 8, rotate=True)
    plain = lis.rounded_input(x, steps, [(0, 16)], 8, rotate=False)
    assert (rotated - x).abs().max() < 0.05  # 8 bits over a range of ~8: steps of ~0.03, rotated back
    assert not torch.equal(rotated, plain)


def test_mean_share() -> None:
    steps = torch.tensor([0, 0, 1, 1])
    const = torch.tensor([1.0, 1.0, -2.0, -2.0])[:, None, None, None].expand(4, 3, 2, 2).clone()
    assert lis.mean_share(const, steps) == pytest.approx(1.0)
    zero_mean = torch.tensor([1.0, -1.0, 3.0, -3.0])[:, None, None, None].expand(4, 3, 2, 2).clone()
    assert lis.mean_share(zero_mean, steps) == pytest.approx(0.0)
    # a linear's [N, L, C]: the mean is per step and channel, over samples *and* tokens (not per token)
    tokens = torch.tensor([[2.0, 0.0], [2.0, 0.0], [1.0, 1.0], [1.0, 1.0]])[:, :, None]  # [4, 2, 1]
    assert lis.mean_share(tokens, steps) == pytest.approx(8 / 12)  # per token it would be 12 / 12


def test_layer_output_matches_the_module() -> None:
    conv, lin = torch.nn.Conv2d(4, 3, 3, padding=1), torch.nn.Linear(4, 3)
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(lis.layer_output(conv, x), conv(x))
    tokens = torch.randn(2, 7, 4)  # main() moves a linear's channels to dim 1
    torch.testing.assert_close(lis.layer_output(lin, tokens.movedim(-1, 1)), lin(tokens))
