"""What every distillation LightningModule of dq shares: teacher, student and calibration set, the optimizer groups,
activation calibration of whatever the callbacks left uninitialised, and the NaN guard.

Order of initialisation inside `Trainer.fit` (Lightning runs callbacks' hooks before the module's):
`setup` — callbacks change parameter *shapes* here (TPQ expands quantizers to `[T]`), before `configure_optimizers`;
`on_fit_start` — callbacks change parameter *values* in place (Weight Dilation, per-step calibration), then the
module calibrates the activation quantizers still uninitialised and, where a checkpoint exists, loads it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dq.distill.calibration import CalibrationSet
from dq.distill.parallel import broadcast_from_first, sum_gradients
from dq.errors import UserError
from dq.quant import (
    LowRankDelta,
    QuantLayerMixin,
    TemporalQuantizer,
    UniformQuantizer,
    act_quantizers,
    adapter,
    calibrate_activations,
    same_timesteps,
    stored_weight,
    timestep_table,
)
from dq.quant.quantizer import SCALE_MIN

__all__ = [
    "NoDistillation",
    "NonFiniteLossError",
    "QuantDistillation",
    "RelativeAdam",
    "calibrate_student",
    "lr_factor",
    "param_groups",
    "step_sizes",
]

# optimizer groups; biases and norm affines go with weights; "lora": adapters (QALoRA); "@rel": activation step
# sizes at a relative rate; "zero_points": every zero-point, at a rate of its own (in grid units)
GROUPS = ("weights", "lora", "weight_qparams", "act_qparams", "act_qparams@rel", "zero_points")


# what a NonFiniteLossError tells the user to do
DIVERGED = (
    "Training diverged: re-run with lower learning rates (distill.lr_weight, lr_weight_qparams, lr_act_qparams) in a "
    "new run directory, or check the teacher and the calibration set; the same settings would diverge again"
)


class NonFiniteLossError(UserError, RuntimeError):
    """A distillation loss (or a trained parameter) became NaN or infinite: the message names where, the last good
    checkpoint and the settings to change (the command-line tools print it as one line and exit with 2)."""


def calib_inputs(calib: CalibrationSet, idx: Tensor, device: torch.device) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """`(x_t [B, C, H, W], t [B], kwargs)` of calibration entries `idx` on `device` (kwargs: conditioning)."""
    kwargs = {}
    if calib.encoder_hidden_states is not None:
        kwargs["encoder_hidden_states"] = calib.encoder_hidden_states[idx].to(device)
    return calib.x_t[idx].to(device), calib.timesteps[idx].to(device), kwargs


@torch.no_grad()
def calibrate_student(
    student: nn.Module,
    calib: CalibrationSet,
    batch_size: int,
    force: bool = False,
    progress: bool = True,
    pooled: bool = False,
) -> list[str]:
    """Initialise activation ranges (per step where quantizers are temporal; `pooled`: every step from all steps'
    activations together) on the calibration set.

    Returns the names of the quantizers initialised (none, without a forward pass, when all already were).
    """
    if not force and all(q.initialized for _, q in act_quantizers(student)):
        return []
    device = next(student.parameters()).device
    with calibrate_activations(student, force=force, pooled=pooled) as names:
        for idx in tqdm(torch.arange(len(calib)).split(batch_size), desc="calibrating", disable=not progress):
            x, t, kwargs = calib_inputs(calib, idx, device)
            student(x, t, **kwargs)
    return names


def lr_factor(bits: int, lr_bits: int | None) -> float:
    """Learning-rate factor of a student with `bits`-bit weights when the rates are given for `lr_bits`-bit weights.

    `(2^lr_bits - 1) / (2^bits - 1)`: the ratio of the two grids' step sizes over the same range, so a rate moves
    weights and step sizes by the same fraction of a step at every bit-width. 1 when `lr_bits` is None.
    """
    return 1.0 if lr_bits is None else (2**lr_bits - 1) / (2**bits - 1)


def weight_bits(module: nn.Module) -> int | None:
    """The weight bit-width of most of `module`'s quantized layers (the student's `bits`; the 8-bit `keep_8bit`
    layers of a 4-bit student do not change it); None when no layer quantizes its weights."""
    layers = [m for m in module.modules() if isinstance(m, QuantLayerMixin) and m.weight_quantizer.enabled]
    return Counter(m.weight_quantizer.bits for m in layers).most_common(1)[0][0] if layers else None


def param_groups(
    module: nn.Module,
    lrs: dict[str, float],
    lr_bits: int | None = None,
    act_step_rel: float | None = None,
    zero_point_lr: float | None = None,
) -> list[dict[str, Any]]:
    """Adam parameter groups of `module`: latent weights (+ biases, norm affines), adapters, weight Δ/z, activation Δ/z.

    Args:
        module: The quantized model (or a part of it).
        lrs: Learning rate of "weights", "weight_qparams" and "act_qparams", and of "lora" (the `LowRankDelta`
            adapters of `dq.quant.lora`; 0 when absent); a group with lr 0 is left out (its parameters stay frozen).
        lr_bits: The weight bit-width `lrs` are for. When the student's `weight_bits` is another `b`, the weights,
            biases and weight step sizes of its quantized layers go to groups `"<name>@w<b>"` with the rate times
            `lr_factor(b, lr_bits)`; zero-points (grid units), norm affines and activation parameters keep the plain
            rates. None: no scaling.
        act_step_rel: When given, the activation step sizes leave group `"act_qparams"` for group
            `"act_qparams@rel"` with this rate and `"relative": True`: `RelativeAdam` moves each of them by about
            this fraction of its own value per step. None: they train at `lrs["act_qparams"]` like zero-points.
        zero_point_lr: When given, the zero-points of weight and activation quantizers leave their groups for group
            `"zero_points"` at this rate. A zero-point counts grid steps and the forward pass uses `round(z)`, so at
            the step-size rates (1e-4 .. 1e-3 per step, Adam's steps being about `lr` long) it never moves by the
            half step that would change it; this rate is in grid steps per step. None: they stay in their groups.

    Returns:
        `[{"name", "params", "lr"}]` (and `"relative"`) for the groups with parameters and a positive lr.
    """
    kind: dict[int, str] = {}
    for m in module.modules():
        group = "weight_qparams" if isinstance(m, UniformQuantizer) else "act_qparams"
        if isinstance(m, UniformQuantizer | TemporalQuantizer):
            kind.update({id(p): group for p in m.parameters(recurse=False)})
            if zero_point_lr is not None and isinstance(m.zero_point, nn.Parameter):
                kind[id(m.zero_point)] = "zero_points"
        if isinstance(m, LowRankDelta):
            kind.update({id(p): "lora" for p in m.parameters(recurse=False)})
        if isinstance(m, TemporalQuantizer) and act_step_rel is not None and isinstance(m.scale, nn.Parameter):
            kind[id(m.scale)] = "act_qparams@rel"
    lrs = {"lora": 0.0, **lrs, "act_qparams@rel": act_step_rel or 0.0, "zero_points": zero_point_lr or 0.0}
    bits = weight_bits(module)
    scaled: set[int] = set()  # ids of the bit-scaled parameters
    if lr_bits is not None and bits is not None and bits != lr_bits:
        for m in module.modules():
            if isinstance(m, QuantLayerMixin) and m.weight_quantizer.enabled:
                step = m.weight_quantizer.scale
                scaled.update(id(p) for p in (stored_weight(m), m.bias, step) if isinstance(p, nn.Parameter))
                if (delta := adapter(m)) is not None:  # its adapter
                    scaled.update(map(id, delta.parameters()))
    params: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for p in module.parameters():
        params.setdefault((kind.get(id(p), "weights"), id(p) in scaled), []).append(p)
    order = sorted(params, key=lambda k: (GROUPS.index(k[0]), k[1]))
    return [
        {
            "name": g + (f"@w{bits}" if is_scaled else ""),
            "params": params[g, is_scaled],
            "lr": float(lrs[g]) * (lr_factor(bits, lr_bits) if is_scaled else 1.0),
            "relative": g == "act_qparams@rel",
        }
        for g, is_scaled in order
        if lrs[g] > 0
    ]


def step_sizes(module: nn.Module) -> list[nn.Parameter]:
    """The trainable step sizes Δ of `module`'s weight and activation quantizers."""
    quantizers = (m for m in module.modules() if isinstance(m, UniformQuantizer | TemporalQuantizer))
    return [q.scale for q in quantizers if isinstance(q.scale, nn.Parameter)]


class RelativeAdam(torch.optim.Adam):
    """Adam whose groups marked `"relative": True` take steps relative to each element's own value, and which keeps
    the step sizes it is given at `SCALE_MIN` or above.

    A relative element becomes `p * exp(-lr * m̂ / (√v̂ + ε))` instead of `p - lr * m̂ / (√v̂ + ε)`: a step of Adam's
    size on `log |p|` (Adam's moments still see the gradient in `p`), so a step size of 1e-4 and one of 1e-1 both
    change by about `lr` of themselves, and none changes sign. Other groups are plain Adam.

    `step_sizes`: put back to `SCALE_MIN` after a step that took them below it. Fake quantization clamps Δ there, and
    the clamp passes no gradient below it, so a Δ that an absolute step moved past zero (an 8-bit softmax's Δ ≈ 0.004
    at EfficientDM's rate of 5e-4 per step) stayed stuck for good, its activation quantized to about 0.
    """

    def __init__(self, params: Any, step_sizes: Iterable[Tensor] = (), **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.step_sizes = list(step_sizes)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One Adam step; then each relative element is put at `old * exp(new - old)`, each step size at
        `max(Δ, SCALE_MIN)`."""
        before = [(p, p.detach().clone()) for g in self.param_groups if g.get("relative") for p in g["params"]]
        loss = super().step(closure)
        for p, old in before:  # Adam moved p by d = new - old; as a step on log|p|: old * exp(d)
            p.copy_(old * torch.exp(p - old))
        for p in self.step_sizes:
            p.clamp_(min=SCALE_MIN)
        return loss


def check_finite(loss: Tensor, where: str, checkpoint: Path | None) -> None:
    """Raise `NonFiniteLossError` naming `where` when `loss` is NaN or infinite."""
    if not bool(torch.isfinite(loss)):
        raise NonFiniteLossError(
            f"non-finite distillation loss ({loss.item()}) in {where}{kept_checkpoint(checkpoint)}. {DIVERGED}"
        )


def check_finite_parameters(model: nn.Module, where: str, checkpoint: Path | None) -> None:
    """Raise `NonFiniteLossError` naming `where` and up to four parameters when any of `model`'s is NaN or infinite
    (a finite loss whose update overflowed: the next loss would catch it, but not after the last step)."""
    if bad := [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]:
        raise NonFiniteLossError(
            f"{where} left non-finite parameters {bad[:4]}{kept_checkpoint(checkpoint)}. {DIVERGED}"
        )


def kept_checkpoint(checkpoint: Path | None) -> str:
    """'; the last good checkpoint is <file>' where one was written (none before the first block finishes)."""
    return f"; the last good checkpoint is {checkpoint}" if checkpoint is not None and checkpoint.is_file() else ""


def check_lr_bits(lr_bits: object) -> None:
    """`distill.lr_bits`: the weight bit-width the learning rates are for, a whole number in [2, 16], or None."""
    if lr_bits is not None and (type(lr_bits) is not int or not 2 <= lr_bits <= 16):
        raise ValueError(
            f"distill.lr_bits={lr_bits!r} is invalid: the weight bit-width the learning rates are for, an integer "
            "in [2, 16], or null for no per-bit-width scaling"
        )


def cosine_factor(i: int, n: int, schedule: str) -> float:
    """Learning-rate factor at step `i` of `n`: 1 for "constant", half a cosine from 1 to 0 for "cosine"."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + torch.cos(torch.tensor(torch.pi * i / max(n, 1))).item())
    raise ValueError(f"lr_schedule={schedule!r} is invalid: allowed values are 'constant', 'cosine'")


class QuantDistillation(pl.LightningModule):
    """Base LightningModule: holds the frozen teacher, the quantized student and the calibration set.

    Both models run in eval mode throughout (dropout off), so block inputs captured from the student are reproduced
    exactly when a block is re-run. Subclasses set `max_steps` and implement `training_step`.

    Args:
        teacher: The full-precision UNet (frozen).
        student: The quantized copy (`quantize_student`); trained in place.
        calib: Calibration pairs `(x_t, t)` from teacher trajectories.
        calib_batch_size: Batch size of calibration and of block-input capture passes.
        run_dir: Run directory (checkpoints go to `<run_dir>/checkpoints`); None: no checkpoints.
        seed: Seed of the minibatch sampling.
        fingerprint: Identifies the configuration; a checkpoint of another fingerprint is refused.
        name: The `distill` option's name (results.json `method.distill`).
        progress: Progress bars of calibration passes.
    """

    max_steps: int = 0

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        calib: CalibrationSet,
        calib_batch_size: int = 128,
        run_dir: str | Path | None = None,
        seed: int = 0,
        fingerprint: str = "",
        name: str = "",
        progress: bool = True,
    ) -> None:
        super().__init__()
        table = timestep_table(student)
        if table is not None and not same_timesteps(table, calib.table):
            # calib.step_index picks each pair's per-step (TPQ) ranges: it must index the student's table
            raise ValueError(
                f"the calibration set was drawn for the timesteps {calib.table.tolist()}, the student was quantized "
                f"for {table.tolist()}: build both from one scheduler (model.num_inference_steps)"
            )
        self.automatic_optimization = False
        self.teacher = teacher.requires_grad_(False)
        self.student = student
        self.calib = calib
        self.calib_batch_size = calib_batch_size
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.seed = seed
        self.fingerprint = fingerprint
        self.method_name = name
        self.progress = progress
        self.start_step = 0  # first global step to run (later than 0 after resuming from a checkpoint)

    @property
    def checkpoint_dir(self) -> Path | None:
        """`<run_dir>/checkpoints`, or None without a run directory."""
        return self.run_dir / "checkpoints" if self.run_dir is not None else None

    def train(self, mode: bool = True) -> QuantDistillation:
        super().train(mode)
        self.teacher.eval()
        self.student.eval()
        return self

    def on_fit_start(self) -> None:
        """Calibrate the activation quantizers no callback initialised (shared ranges when TPQ is off)."""
        self.student.eval()
        calibrate_student(self.student, self.calib, self.calib_batch_size, progress=self.progress)

    def on_train_start(self) -> None:
        """trainer=ddp: each process has run the callbacks, the calibration and the checkpoint load on its own; all
        go on from the first process's student, so that no difference among them (a GPU kernel's float order) grows."""
        broadcast_from_first(self.student)

    def train_dataloader(self) -> DataLoader:
        """The global step indices still to run, one per batch (the real minibatches are drawn inside)."""
        return DataLoader(torch.arange(self.start_step, self.max_steps), batch_size=1)

    def training_step(self, batch: Tensor, batch_idx: int) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def set_optimization(
        self,
        batch_size: int,
        lr_weight: float,
        lr_weight_qparams: float,
        lr_act_qparams: float,
        lr_schedule: str,
        lr_bits: int | None = None,
        lr_act_step_rel: float | None = None,
        lr_lora: float = 0.0,
        lr_zero_point: float | None = None,
        adam_eps: float = 1e-8,
        lr_rounding: float = 0.0,
    ) -> None:
        """Validate and keep the minibatch size, the groups' learning rates / schedule, the weight bit-width the
        rates are for, the relative rate of activation step sizes, the zero-points' own rate (`param_groups`),
        Adam's ε (BKD, model KD) and AdaRound's rate (BKD)."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if not (math.isfinite(adam_eps) and adam_eps > 0):  # also refuses NaN
            raise ValueError(
                f"distill.adam_eps={adam_eps} must be a finite number > 0: Adam's ε, added to the root of each "
                "parameter's squared-gradient average (1e-8 by default)"
            )
        cosine_factor(0, 1, lr_schedule)  # validates the name
        named = {"lr_weight": lr_weight, "lr_lora": lr_lora, "lr_weight_qparams": lr_weight_qparams,
                 "lr_act_qparams": lr_act_qparams}  # fmt: skip
        if lr_zero_point is not None:
            named["lr_zero_point"] = lr_zero_point
        if lr_rounding != 0:
            named["lr_rounding"] = lr_rounding
        if bad := [f"distill.{k}={v}" for k, v in named.items() if not math.isfinite(v)]:  # NaN would drop the group
            raise ValueError(f"{', '.join(bad)}: learning rates must be finite numbers")
        if lr_act_step_rel is not None:
            named["lr_act_step_rel"] = lr_act_step_rel
        if bad := [f"distill.{k}={v}" for k, v in named.items() if v < 0]:
            raise ValueError(f"{', '.join(bad)}: learning rates must be >= 0 (0 freezes that group)")
        if lr_act_step_rel is not None and not 0 <= lr_act_step_rel < 1:  # also refuses NaN
            raise ValueError(
                f"distill.lr_act_step_rel={lr_act_step_rel} must be in [0, 1): it is the fraction of its own value an "
                "activation step size moves per step (try 1e-3 .. 1e-2; 0 freezes them), or null for the absolute "
                "lr_act_qparams"
            )
        if not any(named.values()):
            raise ValueError(
                f"distill.{'=0, '.join(named)}=0: nothing would train. "
                "For post-training quantization without training use distill=none."
            )
        check_lr_bits(lr_bits)
        self.batch_size = batch_size
        self.lr_bits = lr_bits
        self.lrs = {"weights": lr_weight, "lora": lr_lora, "weight_qparams": lr_weight_qparams,
                    "act_qparams": lr_act_qparams}  # fmt: skip
        self.lr_act_step_rel = lr_act_step_rel
        self.lr_zero_point = lr_zero_point
        self.lr_rounding = lr_rounding
        self.lr_schedule = lr_schedule
        self.adam_eps = adam_eps

    def make_adam(self) -> RelativeAdam:
        """`RelativeAdam` over the student's `param_groups` (rates scaled per weight bit-width, activation step sizes
        relative when `lr_act_step_rel` is set, zero-points apart when `lr_zero_point` is), each group remembering
        its `base_lr` for `schedule_lr`."""
        groups = param_groups(self.student, self.lrs, self.lr_bits, self.lr_act_step_rel, self.lr_zero_point)
        return RelativeAdam(
            [g | {"base_lr": g["lr"]} for g in groups], step_sizes=step_sizes(self.student), eps=self.adam_eps
        )

    def schedule_lr(self, i: int, n: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Set every group's learning rate for step `i` of `n` (cosine to 0, or constant) in `optimizer` (default:
        the fit's, `self.optimizers()`); a group marked `"constant"` keeps its `base_lr`."""
        for g in (optimizer if optimizer is not None else self.optimizers()).param_groups:
            g["lr"] = g["base_lr"] * (1.0 if g.get("constant") else cosine_factor(i, n, self.lr_schedule))

    def take_step(self, optimizer: Any, loss: Tensor) -> None:
        """Backward `loss` (this process's part), sum the gradients over the processes (`trainer=ddp`; nothing in one
        process) and take `optimizer`'s step (a `LightningOptimizer`)."""
        optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:  # not where this process's share of the minibatch was empty (trainer=ddp)
            self.manual_backward(loss)
        sum_gradients(p for g in optimizer.optimizer.param_groups for p in g["params"])
        optimizer.step()

    def freeze_all_but(self, params: Iterable[nn.Parameter]) -> None:
        """`requires_grad` only for `params`."""
        self.student.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)


class NoDistillation(QuantDistillation):
    """`distill=none`: no training; the fit only runs the callbacks (WD, TPQ) and the remaining calibration."""

    max_steps = 0

    def configure_optimizers(self) -> None:
        return None  # nothing trains

    def training_step(self, batch: Tensor, batch_idx: int) -> None:  # pragma: no cover - never called
        raise RuntimeError("NoDistillation has no training steps")
