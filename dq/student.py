"""Build the student the `quantizer` config asks for: none for `fp`, a calibrated quantized copy otherwise."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig
from torch import nn


def build_student(cfg: DictConfig, teacher: nn.Module, scheduler: Any) -> tuple[nn.Module | None, dict[str, Any]]:
    """Return `(student, cost)`; `student` is None when the quantizer is `fp` (the teacher is the model)."""
    if cfg.quantizer.name == "fp":
        return None, {}
    raise ValueError(f"quantizer='{cfg.quantizer.name}' is not available in dq-eval yet; use quantizer=fp.")
