"""Build the student the `quantizer` + `bits` configs ask for, shared by `dq-eval` and `dq-train`.

`fp` → no student (the teacher is the model). Otherwise: a quantized copy of the teacher (`quantize_model`), tied to
the sampler's timestep table, whose activation ranges are calibrated on teacher trajectories (`calib` config) —
shared over all steps, or per step when `quantizer.temporal` is true.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dq.distill.base import calibrate_student
from dq.distill.calibration import CalibrationSet, get_calibration_set
from dq.errors import ConfigError
from dq.quant import QuantSpec, expand_act_quantizers, quant_report, quantize_model
from dq.quant.model import act_quantizers, quantizable_layers

log = logging.getLogger(__name__)


SET_BY_BITS = ("weight_bits", "act_bits", "keep_8bit", "attn_prob_bits")  # QuantSpec fields from the bits group


def quant_spec_of(cfg: DictConfig) -> QuantSpec:
    """QuantSpec from `quantizer.spec` (method settings) and the `bits` group (bit-widths, 8-bit exceptions)."""
    bits = {k: cfg.bits[k] for k in SET_BY_BITS}
    spec = OmegaConf.to_container(cfg.quantizer.get("spec") or {}, resolve=True)
    return QuantSpec.from_dict({**spec, **bits})


def check_spec(cfg: DictConfig) -> None:
    """Build the QuantSpec once at start-up, so a bad `bits` / `quantizer.spec` value is named before any work."""
    try:
        quant_spec_of(cfg)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"bits / quantizer.spec: {e}") from e


def check_layers(cfg: DictConfig, teacher: nn.Module) -> None:
    """Once the teacher is loaded: every `bits.keep_8bit` entry names one of its quantizable layers."""
    try:
        quant_spec_of(cfg).check_keep_8bit(quantizable_layers(teacher), "config: bits.keep_8bit")
    except ValueError as e:
        raise ConfigError(str(e)) from e


def sampler_timesteps(scheduler: Any, num_inference_steps: int) -> torch.Tensor:
    """[T] the sampler's timestep table; step index i is position i (0 = first, noisiest step)."""
    scheduler.set_timesteps(num_inference_steps)
    return scheduler.timesteps.clone()


def calibration_set(cfg: DictConfig, teacher: nn.Module, scheduler: Any) -> CalibrationSet:
    """The cached `(x_t, t)` calibration set drawn from teacher DDIM trajectories."""
    return get_calibration_set(
        teacher, copy.deepcopy(scheduler), cfg.calib.n_calib, cfg.model.num_inference_steps,
        tuple(cfg.model.sample_shape), cfg.calib.seed, cfg.calib.batch_size, cache_root=cfg.eval.cache_dir,
        progress=cfg.eval.progress, n_traj=cfg.calib.get("n_traj"),
    )  # fmt: skip


def quantize_student(cfg: DictConfig, teacher: nn.Module, scheduler: Any) -> nn.Module:
    """A quantized deep copy of the teacher (activation quantizers not yet calibrated)."""
    student = copy.deepcopy(teacher)
    report = quantize_model(student, quant_spec_of(cfg), sampler_timesteps(scheduler, cfg.model.num_inference_steps))
    counts = report.summary()  # layer kinds only: activation ranges are shared until TPQ / temporal makes them per step
    kinds = ", ".join(f"{counts[k]} {k}" for k in ("conv", "linear", "attn-matmul") if k in counts)
    log.info(f"quantized {counts['total']} layers ({kinds}); {counts.get('split', 0)} inputs split into two ranges")
    return student


def build_student(
    cfg: DictConfig, teacher: nn.Module, scheduler: Any, calibrate: bool = True
) -> tuple[nn.Module | None, dict[str, Any]]:
    """Return `(student, cost)`; `student` is None for `quantizer=fp`. Used as is by PTQ baselines in dq-eval.

    `calibrate=False` leaves the activation quantizers uninitialised: a structure to load calibrated ranges into
    (`dq-eval trainer=ddp`, whose other processes take the first's).
    """
    if cfg.quantizer.name == "fp":
        return None, {}
    start = time.perf_counter()
    student = quantize_student(cfg, teacher, scheduler)
    if cfg.quantizer.get("temporal", False):
        expand_act_quantizers(student)
        n = sum(1 for _ in act_quantizers(student))
        log.info(f"quantizer.temporal: {n} activation quantizers x {cfg.model.num_inference_steps} steps")
    if calibrate:
        calib = calibration_set(cfg, teacher, scheduler)
        calibrate_student(student, calib, cfg.calib.batch_size, progress=cfg.eval.progress)
    if cfg.eval.get("print_report", False):
        log.info(quant_report(student))
    return student.eval(), {"calib_s": time.perf_counter() - start}
