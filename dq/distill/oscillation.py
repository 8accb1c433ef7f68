"""Weight oscillation in quantization-aware training (Nagel et al. 2022, "Overcoming Oscillations in
Quantization-Aware Training"): tracking it, and the two remedies of that paper, dampening and freezing.

A latent weight whose optimum lies between two grid points is pushed across the rounding edge between them from
both sides in turn: its integer code flips back and forth, and where training stops decides which of the two it
keeps. `OscillationTracker` counts such flips and can freeze the weights that flip often; `dampening_loss` pulls each
latent weight towards the centre of its current bin, so that it settles on one side. On dq's embedded benchmark
neither helps (BENCHMARKS.md "Oscillating weights"); BKD uses both only when asked (`distill.dampen`, `distill.freeze`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from dq.quant import QuantLayerMixin, adapter, quantized_weight_layers

__all__ = ["OscillationTracker", "dampening_loss", "trained_weight_layers"]


def trained_weight_layers(modules: Iterable[nn.Module]) -> list[QuantLayerMixin]:
    """The quantized layers in `modules` (and below) whose latent weight is a trained Parameter on an active grid:
    weight quantizer enabled and initialised, no low-rank adapter (`dq.quant.lora`), `requires_grad`. Deduplicated,
    in module order."""
    return [m for m in quantized_weight_layers(modules) if adapter(m) is None and m.weight.requires_grad]


def dampening_loss(layers: Iterable[QuantLayerMixin]) -> Tensor:
    """Mean over every weight of `layers` of `((clamp(W) - Q_w(W)) / Δ)^2`: each latent weight's squared distance
    to the centre of its bin, in steps (0 on the grid, at most 1/4 inside the range).

    `Q_w(W)` and `Δ` are constants here (detached), so the term moves latent weights only, never the grid; `W` is
    first clamped into the grid's range `[Δ (qmin - z), Δ (qmax - z)]`, so clipped weights are left alone (Nagel et
    al.'s dampening loss, measured in steps so that one weight of it means the same in every layer).
    """
    total, count = None, 0
    for m in layers:
        wq, w = m.weight_quantizer, m.weight
        scale, zp = wq.grid(w)  # [C_out, 1, ...]
        lo, hi = scale * (wq.qmin - zp), scale * (wq.qmax - zp)
        with torch.no_grad():
            centre = wq(w)  # the target: no graph through the quantizer
        dist = (torch.minimum(torch.maximum(w, lo), hi) - centre) / scale
        part = dist.pow(2).sum()
        total = part if total is None else total + part
        count += w.numel()
    if total is None:
        raise ValueError("dampening_loss: no quantized layer with a trained latent weight was given")
    return total / count


class OscillationTracker:
    """Counts, per latent weight of `layers`, how often its integer code reverses direction (Nagel et al.'s
    oscillations: a flip up after a flip down, or down after up), and freezes the weights that oscillate often.

    Call `update()` after each optimizer step; `share()` is the fraction of the weights that oscillated at least
    once since the tracker was made, `flips()` the mean number of code changes per weight. With a `freeze_threshold`
    above 0, `update()` also keeps an exponential moving average (`momentum`) of each weight's oscillations and of its
    code; a weight whose average oscillation frequency passes the threshold is frozen at its average code, rounded
    (Nagel et al.'s iterative weight freezing): from then on every `update()` puts the latent weight back on that
    code's grid point, `Δ (code - z)`, whatever the optimizer did.
    """

    def __init__(
        self, layers: Iterable[QuantLayerMixin], freeze_threshold: float = 0.0, momentum: float = 0.01
    ) -> None:
        self.layers = list(layers)
        self.freeze_threshold = freeze_threshold
        self.momentum = momentum
        self._codes = [m.weight_quantizer.codes(m.weight) for m in self.layers]
        self._direction = [torch.zeros_like(c) for c in self._codes]  # sign of each weight's last change, 0: none
        self._oscillations = [torch.zeros_like(c) for c in self._codes]
        self._changes = [torch.zeros_like(c) for c in self._codes]
        self._frequency = [torch.zeros_like(c) for c in self._codes]  # moving average of oscillations per step
        self._mean_codes = [c.clone() for c in self._codes]  # moving average of the codes
        self._frozen = [torch.zeros_like(c, dtype=torch.bool) for c in self._codes]
        self._frozen_codes = [torch.zeros_like(c) for c in self._codes]

    @torch.no_grad()
    def update(self) -> None:
        """Compare each weight's code with the one at the last update; freeze and hold frozen weights."""
        m_ = self.momentum
        for i, m in enumerate(self.layers):
            codes = m.weight_quantizer.codes(m.weight)
            direction = torch.sign(codes - self._codes[i])  # [-1, 0, 1] per weight
            changed = direction != 0
            oscillated = direction * self._direction[i] == -1  # reversed its last change
            self._oscillations[i] += oscillated
            self._changes[i] += changed
            self._direction[i] = torch.where(changed, direction, self._direction[i])
            if self.freeze_threshold > 0:
                self._frequency[i].mul_(1 - m_).add_(oscillated.float(), alpha=m_)
                new = (self._frequency[i] > self.freeze_threshold) & ~self._frozen[i]
                self._frozen_codes[i] = torch.where(new, self._mean_codes[i].round(), self._frozen_codes[i])
                self._frozen[i] |= new
                self._mean_codes[i].mul_(1 - m_).add_(codes, alpha=m_)
                if self._frozen[i].any():  # back onto the frozen code's grid point
                    w = m.weight
                    scale, zp = m.weight_quantizer.grid(w)
                    w.copy_(torch.where(self._frozen[i], (scale * (self._frozen_codes[i] - zp)).to(w.dtype), w))
                    codes = torch.where(self._frozen[i], self._frozen_codes[i], codes)
            self._codes[i] = codes

    def _mean(self, counts: list[Tensor]) -> float:
        n = sum(c.numel() for c in counts)
        return sum(float(c.sum()) for c in counts) / n if n else 0.0

    def share(self) -> float:
        """Fraction of the weights that oscillated at least once (0 without weights)."""
        return self._mean([(c > 0).float() for c in self._oscillations])

    def flips(self) -> float:
        """Mean number of code changes per weight."""
        return self._mean(self._changes)

    def frozen_share(self) -> float:
        """Fraction of the weights frozen (0 without freezing)."""
        return self._mean([f.float() for f in self._frozen])
