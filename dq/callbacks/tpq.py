"""`TemporalParallelQuantizer` callback (DilateQuant section 2): one activation (Δ, z) per sampling step.

`setup` turns every activation quantizer of the student (layer inputs, attention q/k/v/probabilities) into a
per-step one with T = the sampler's step count (this replaces parameters, so it must run before the optimizer is
built); `on_fit_start` initialises each step's pair from that step's calibration activations (MSE or min-max, per
the quantizer spec), after Weight Dilation has changed what the quantizers see.
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from dq.distill.base import calibrate_student
from dq.quant import act_quantizers, expand_act_quantizers

log = logging.getLogger(__name__)

__all__ = ["TemporalParallelQuantizer", "tpq_stats"]


def tpq_stats(student: nn.Module) -> dict[str, float]:
    """How much per-step step sizes differ: mean and max over quantizers of `max_t Δ_t / min_t Δ_t`."""
    on = [q for _, q in act_quantizers(student) if q.enabled]  # those kept off (fp_network_input, ...) are unused
    spreads = [(q.scale.max() / q.scale.min().clamp_min(1e-12)).item() for q in on]
    steps = [q.num_steps for q in on]
    return {
        "quantizers": float(len(spreads)),
        "steps": float(max(steps, default=0)),
        "scale_spread_mean": float(torch.tensor(spreads).mean()) if spreads else 0.0,
        "scale_spread_max": max(spreads, default=0.0),
    }


class TemporalParallelQuantizer(pl.Callback):
    """Per-step activation quantizers, initialised per step from the calibration set.

    Args:
        batch_size: Calibration batch size (default: the module's `calib_batch_size`).
        num_steps: T (default: the length of the student's timestep table).
        init: "per_step" (DilateQuant: each step's pair from that step's activations) or "shared" (every step
            starts from the pair of all steps' activations together and only training tells them apart, as
            EfficientDM's TALSQ).
    """

    order = 10  # after WeightDilation (see train.py)

    def __init__(self, batch_size: int | None = None, num_steps: int | None = None, init: str = "per_step") -> None:
        if init not in ("per_step", "shared"):
            raise ValueError(f"callbacks.tpq.init={init!r} is invalid: allowed values are 'per_step', 'shared'")
        self.batch_size = batch_size
        self.num_steps = num_steps
        self.init = init
        self.stats: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        expand_act_quantizers(pl_module.student, self.num_steps)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        bs = self.batch_size or pl_module.calib_batch_size
        calibrate_student(pl_module.student, pl_module.calib, bs, force=True, progress=pl_module.progress,
                          pooled=self.init == "shared")  # fmt: skip
        self.stats = tpq_stats(pl_module.student)
        log.info(
            f"TPQ: {int(self.stats['quantizers'])} activation quantizers x {int(self.stats['steps'])} steps; "
            f"step sizes differ across steps by x{self.stats['scale_spread_mean']:.2f} on average"
        )
        for logger in trainer.loggers:
            logger.log_metrics({f"tpq/{k}": v for k, v in self.stats.items()}, step=0)
