"""AdaRound (Nagel et al. 2020): each weight learns whether it rounds down or up, in place of rounding to nearest.

The weight's code becomes `clamp(floor(W/Δ) + h(α) + z, qmin, qmax)` with `h(α) = clamp(sigmoid(α)(ζ - γ) + γ, 0, 1)`,
the rectified sigmoid (ζ = 1.1, γ = -0.1), and `α` one parameter per weight, started where `h(α)` equals W/Δ's
fractional part (so the soft weight starts at W itself). A regulariser `Σ 1 - |2h(α) - 1|^β` with β falling from 20 to
2 drives every `h` to 0 or 1; training ends with the hard choice `α >= 0`. BRECQ, Q-Diffusion and EDA-DM reconstruct
blocks this way with the weights and their step sizes frozen (the `ptq_recon` baseline: `distill.lr_rounding`).

`attach_adaround(layers)` gives each layer's weight quantizer an `AdaRound`; `bake_adaround(layers)` writes the hard
choice into the latent weight (as a grid value, which round-to-nearest maps to the same code) and removes it, so the
model is an ordinary quantized model again.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from dq.quant.layers import quantized_weight_layers

__all__ = [
    "AdaRound",
    "attach_adaround",
    "bake_adaround",
    "rounding_beta",
    "rounding_loss",
    "ZETA",
    "GAMMA",
]

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (Nagel et al. 2020)
BETA_START, BETA_END = 20.0, 2.0  # the regulariser's exponent, annealed linearly (BRECQ's defaults)
WARMUP = 0.2  # share of a block's steps before the regulariser starts (BRECQ's default)


def rounding_beta(i: int, n: int) -> float | None:
    """The regulariser's β at step `i` of `n`, counted from 1 as BRECQ counts them: None up to the first `WARMUP`
    share of steps (no regulariser), then falling linearly from `BETA_START` to `BETA_END` at step `n` (BRECQ's
    `LinearTempDecay`)."""
    start = WARMUP * n
    if i < start:
        return None
    return BETA_END + (BETA_START - BETA_END) * max(0.0, 1.0 - (i - start) / max(n - start, 1))


class AdaRound(nn.Module):
    """Learned rounding of one weight on its quantizer's grid.

    Args:
        weight: The latent weight the quantizer sees (fixed while `α` trains).
        scale: Its step sizes Δ as `UniformQuantizer.grid` gives them, broadcastable to `weight`.
    """

    def __init__(self, weight: Tensor, scale: Tensor) -> None:
        super().__init__()
        w = weight.detach().float()
        rest = w / scale
        rest = (rest - rest.floor()).clamp(1e-6, 1 - 1e-6)  # in (0, 1): the inverse below stays finite
        alpha = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)  # h(α) = rest
        self.alpha = nn.Parameter(alpha.to(weight.dtype))

    def soft(self) -> Tensor:
        """`h(α)` in [0, 1], the share of a step each weight rounds up by while training."""
        return (torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def hard(self) -> Tensor:
        """The final choice, 1 (up) where `α >= 0` (where `h(α) >= 0.5`), else 0."""
        return (self.alpha >= 0).to(self.alpha.dtype)

    def codes(self, x: Tensor, scale: Tensor, z: Tensor, qmin: int, qmax: int, hard: bool = False) -> Tensor:
        """`clamp(floor(x/Δ) + h + z, qmin, qmax)` for Δ `scale` and rounded zero-point `z`, `h` the soft `h(α)` or,
        with `hard`, the final choice."""
        return torch.clamp(torch.floor(x / scale) + (self.hard() if hard else self.soft()) + z, qmin, qmax)

    def regularizer(self, beta: float) -> Tensor:
        """`Σ 1 - |2h(α) - 1|^β`: 0 once every `h` is 0 or 1."""
        return (1 - (2 * self.soft() - 1).abs().pow(beta)).sum()

    def forward(self, x: Tensor, scale: Tensor, z: Tensor, qmin: int, qmax: int) -> Tensor:
        """`Δ (clamp(floor(x/Δ) + h(α) + z, qmin, qmax) - z)` for the grid `(Δ, round(z))` of
        `UniformQuantizer.grid` (detached); the gradient reaches `α` alone (x, Δ and z stay fixed, as in BRECQ)."""
        return (scale * (self.codes(x.detach().float(), scale, z, qmin, qmax) - z)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.alpha.shape)}"


def attach_adaround(modules: Iterable[nn.Module]) -> list[AdaRound]:
    """Give the weight quantizer of every quantized layer in `modules` an `AdaRound` started at its latent weight;
    returns them (their `alpha`s are what trains). A layer with a low-rank adapter (`dq.quant.lora`) is refused."""
    added = []
    for layer in quantized_weight_layers(modules):
        if torch.nn.utils.parametrize.is_parametrized(layer, "weight"):
            raise ValueError("AdaRound on a layer with low-rank adapters: merge them first (dq.quant.lora.merge_lora)")
        wq = layer.weight_quantizer
        wq.rounding = AdaRound(layer.weight, wq.grid(layer.weight)[0])
        added.append(wq.rounding)
    return added


@torch.no_grad()
def bake_adaround(modules: Iterable[nn.Module]) -> int:
    """Write each `AdaRound`'s hard choice into its layer's latent weight (the grid value of the chosen code) and
    remove it; returns how many weights round otherwise than to nearest."""
    changed = 0
    for layer in quantized_weight_layers(modules):
        wq = layer.weight_quantizer
        if wq.rounding is None:
            continue
        w = layer.weight
        scale, zp = wq.grid(w)
        nearest = wq.codes(w)
        codes = wq.rounding.codes(w.float(), scale, zp, wq.qmin, wq.qmax, hard=True)
        w.copy_(((codes - zp) * scale).to(w.dtype))
        wq.rounding = None
        changed += int((codes != nearest).sum())
        if not torch.equal(wq.codes(w), codes):  # a grid value rounds to its own code; a failure here is a bug
            raise RuntimeError(f"AdaRound: baked weights of {type(layer).__name__} do not round to their codes")
    return changed


def rounding_loss(roundings: Iterable[AdaRound], beta: float) -> Tensor:
    """The summed regulariser of `roundings` at exponent `beta`."""
    return torch.stack([r.regularizer(beta) for r in roundings]).sum()
