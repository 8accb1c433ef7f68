"""experiments/layer_input_sqnr.py: its rotation, per-step rounding and bias share against plain references."""

from __future__ import annotations

import pytest
import torch
from conftest import load_script

from dq.quant.quantizer import fake_quant_, mse_search

lis = load_script("layer_input_sqnr")


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


@pytest.mark.parametrize("n", [16, 48])  # Hadamard (symmetric) and random orthogonal (not symmetric)
def test_rotated_rounding_rounds_in_the_rotated_coordinates(n: int) -> None:
    x = torch.randn(8, n, 2, 2, generator=torch.Generator().manual_seed(1))
    steps = torch.tensor([0, 1] * 4)
    h = lis.rotation(n)
    out = lis.rounded_input(x, steps, [(0, n)], 4, rotate=True)
    for i in range(2):  # the reference: round x @ H per step, turn back with Hᵀ
        v = x[steps == i].movedim(1, -1)
        ref = (lis.round_per_tensor(v @ h, 4) @ h.T).movedim(-1, 1)
        torch.testing.assert_close(out[steps == i], ref)
        on_grid = (out[steps == i].movedim(1, -1) @ h).round(decimals=4)  # back in rotated coordinates: 16 levels
        assert len(on_grid.unique()) <= 16
    assert not torch.allclose(out, lis.rounded_input(x, steps, [(0, n)], 4, rotate=False))


def test_mean_share() -> None:
    steps = torch.tensor([0, 0, 1, 1])
    const = torch.tensor([1.0, 1.0, -2.0, -2.0])[:, None, None, None].expand(4, 3, 2, 2).clone()
    assert lis.mean_share(const, steps, 1) == pytest.approx(1.0)
    zero_mean = torch.tensor([1.0, -1.0, 3.0, -3.0])[:, None, None, None].expand(4, 3, 2, 2).clone()
    assert lis.mean_share(zero_mean, steps, 1) == pytest.approx(0.0)
    # a linear's [N, L, C]: the mean is per step and channel, over samples *and* tokens (not per token)
    tokens = torch.tensor([[2.0, 0.0], [2.0, 0.0], [1.0, 1.0], [1.0, 1.0]])[:, :, None]  # [4, 2, 1]
    assert lis.mean_share(tokens, steps, -1) == pytest.approx(8 / 12)  # per token it would be 12 / 12
    flat = torch.tensor([[2.0, 1.0], [0.0, 1.0], [1.0, 3.0], [1.0, 3.0]])  # a linear's [N, C] (the time embedding)
    assert lis.mean_share(flat, steps, -1) == pytest.approx(24 / 26)  # channel means 1, 1 | 1, 3; energies 6 | 20


def test_layer_output_matches_the_module() -> None:
    conv, lin = torch.nn.Conv2d(4, 3, 3, padding=1), torch.nn.Linear(4, 3)
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(lis.layer_output(conv, x), conv(x))
    tokens = torch.randn(2, 7, 4)  # main() moves a linear's channels to dim 1
    torch.testing.assert_close(lis.layer_output(lin, tokens.movedim(-1, 1)), lin(tokens))
