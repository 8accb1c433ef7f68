"""Whole-model distillation (`distill=model_kd`): QAT of the whole quantized UNet on noise-prediction MSE to the
teacher, on calibration minibatches. The ablation of BKD, and the `qat_lsq` baseline (METHOD.md section 5)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dq.distill.base import QuantDistillation, calib_inputs, check_finite, check_finite_parameters
from dq.distill.calibration import CalibrationSet
from dq.distill.parallel import all_sum, shard

__all__ = ["ModelDistillation"]


class ModelDistillation(QuantDistillation):
    """Train every parameter of the student at once: `MSE(student(x_t, t), teacher(x_t, t))`.

    Same optimizer groups and learning-rate names as `BlockwiseDistillation`. Minibatches come from a generator
    seeded by `seed`. No intermediate checkpoints: an interrupted run starts over.

    Args:
        teacher: The full-precision UNet.
        student: The quantized copy, trained in place.
        calib: Calibration pairs `(x_t, t)`.
        iters: Training steps.
        batch_size: Minibatch size.
        lr_weight: Learning rate of latent weights, biases and norm affines.
        lr_weight_qparams: Learning rate of weight step sizes and zero-points.
        lr_act_qparams: Learning rate of activation step sizes and zero-points.
        lr_schedule: "cosine" (to 0 over `iters`) or "constant".
        lr_bits: Weight bit-width the rates are for; a student with other weight bits (`weight_bits`) scales
            `lr_weight` and `lr_weight_qparams` of its quantized layers by the step-size ratio (`param_groups`).
            None: no scaling.
        lr_lora: Learning rate of the adapters of the `lora` callback (QALoRA; EfficientDM); 0 without it.
        lr_act_step_rel: Activation step sizes move by about this fraction of their own value per step
            (`RelativeAdam`) instead of at `lr_act_qparams`; None: absolute, like zero-points.
        lr_zero_point: Learning rate of every zero-point, in grid steps per step (`param_groups`); None: they train
            with their step sizes, at `lr_weight_qparams` / `lr_act_qparams`, where `round(z)` never changes.
        adam_eps: Adam's ε. LSQ's gradient scale makes quantizer parameters' gradients small (mostly 1e-10 .. 1e-8 for
            activation step sizes), where the default 1e-8 shortens their steps below the rates.
        **kwargs: `QuantDistillation` arguments.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        calib: CalibrationSet,
        iters: int = 800,
        batch_size: int = 32,
        lr_weight: float = 1e-5,
        lr_weight_qparams: float = 1e-4,
        lr_act_qparams: float = 1e-4,
        lr_schedule: str = "cosine",
        lr_bits: int | None = 4,
        lr_act_step_rel: float | None = None,
        lr_lora: float = 0.0,
        lr_zero_point: float | None = None,
        adam_eps: float = 1e-8,
        **kwargs: Any,
    ) -> None:
        super().__init__(teacher, student, calib, **kwargs)
        if iters < 1:
            raise ValueError(f"iters={iters} must be >= 1")
        self.set_optimization(batch_size=batch_size, lr_weight=lr_weight, lr_weight_qparams=lr_weight_qparams,
                              lr_act_qparams=lr_act_qparams, lr_schedule=lr_schedule, lr_bits=lr_bits,
                              lr_act_step_rel=lr_act_step_rel, lr_lora=lr_lora,
                              lr_zero_point=lr_zero_point, adam_eps=adam_eps)  # fmt: skip
        self.iters = iters
        self.max_steps = iters
        self._batches: Tensor | None = None  # [iters, batch_size] minibatch indices

    def configure_optimizers(self) -> torch.optim.Optimizer:
        opt = self.make_adam()
        self.freeze_all_but(p for g in opt.param_groups for p in g["params"])
        return opt

    def on_fit_start(self) -> None:
        super().on_fit_start()
        g = torch.Generator().manual_seed(self.seed)
        self._batches = torch.randint(len(self.calib), (self.iters, self.batch_size), generator=g)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        i = int(batch[0])
        self.schedule_lr(i, self.iters)
        opt = self.optimizers()
        mine, share = shard(self._batches[i])  # this process's share of the minibatch (all of it in one process)
        loss = torch.zeros((), device=self.device)  # an empty share (trainer=ddp) adds nothing
        if len(mine):
            x, t, kw = calib_inputs(self.calib, mine, self.device)
            with torch.no_grad():
                target = self.teacher(x, t, **kw).sample
            loss = share * F.mse_loss(self.student(x, t, **kw).sample, target)
        total = all_sum(loss)  # the whole minibatch's mean, the same in every process
        check_finite(total, f"whole-model distillation at step {i}/{self.iters}", None)
        self.take_step(opt, loss)
        self.log("distill/loss", total, prog_bar=True)
        return total

    def on_train_end(self) -> None:
        check_finite_parameters(self.student, f"whole-model distillation's last step ({self.iters}/{self.iters})", None)
        self.student.requires_grad_(False)
