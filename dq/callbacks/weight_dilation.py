"""`WeightDilation` callback (DilateQuant section 1): dilate the student's weights once, before distillation.

From the student's current (full-precision latent) weights it computes one factor `s` per input channel (shared by
layers reading one input, e.g. attention q/k/v), multiplies the weights by `s` and installs `1/s` on the activation
side (`in_scale`), leaving every weight row's range (Δ_w, z_w) unchanged. It logs per-layer statistics and writes
`dilation.json` (statistics + where `1/s` could be folded at export) into the run directory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from dq.quant.dilation import dilate_, fold_report, shared_input_groups
from dq.utils.io import atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["WeightDilation", "dilate_student"]

DILATED_ABOVE = 1.0  # a channel counts as dilated when s > this


@torch.no_grad()
def dilate_student(student: nn.Module, s_max: float = 1e4) -> dict[str, Any]:
    """Dilate every quantized layer of `student` in place (shared `s` per shared-input group).

    Layers without an `in_scale` buffer (left float) or with grouped convolutions are skipped and listed.

    Returns:
        `{"layers": {name: {"s_mean", "s_max", "dilated_share", "channels", "group", "fold"}}, "skipped": {...},
        "summary": {...}}`.
    """
    folds = fold_report(student)
    layers: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    all_s = []
    for group in shared_input_groups(student):
        mods = [student.get_submodule(n) for n in group]
        reason = next(
            (
                "not quantized (no in_scale)" if getattr(m, "in_scale", None) is None else "grouped convolution"
                for m in mods
                if getattr(m, "in_scale", None) is None or getattr(m, "groups", 1) != 1
            ),
            None,
        )
        if reason is not None:
            skipped.update(dict.fromkeys(group, reason))
            continue
        s = dilate_(mods, s_max).detach().double().cpu()  # [C_in]
        all_s.append(s)
        for name in group:
            layers[name] = {
                "s_mean": s.mean().item(),
                "s_max": s.max().item(),
                "dilated_share": (s > DILATED_ABOVE).double().mean().item(),
                "channels": s.numel(),
                "group": group,
                "fold": folds.get(name, ""),
            }
    cat = torch.cat(all_s) if all_s else torch.ones(1, dtype=torch.float64)
    summary = {
        "layers": len(layers),
        "channels": int(cat.numel()),
        "s_mean": cat.mean().item(),
        "s_max": cat.max().item(),
        "dilated_share": (cat > DILATED_ABOVE).double().mean().item(),
        "foldable_layers": sum(1 for v in layers.values() if v["fold"].startswith("foldable")),
    }
    return {"summary": summary, "layers": layers, "skipped": skipped}


class WeightDilation(pl.Callback):
    """Dilate the student at `on_fit_start` (before TPQ calibrates activation ranges on the dilated inputs).

    Args:
        s_max: Upper clip of the dilation factors.
        filename: Report written into the trainer's `default_root_dir` (the run directory).
    """

    order = 0  # train.py sorts callbacks by `order`: dilation must precede activation calibration

    def __init__(self, s_max: float = 1e4, filename: str = "dilation.json") -> None:
        self.s_max = s_max
        self.filename = filename
        self.report: dict[str, Any] | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.report = dilate_student(pl_module.student, self.s_max)
        s = self.report["summary"]
        log.info(
            f"weight dilation: {s['layers']} layers, mean s {s['s_mean']:.3f}, max s {s['s_max']:.2f}, "
            f"{100 * s['dilated_share']:.1f}% of channels dilated, {s['foldable_layers']} layers can fold 1/s"
        )
        metrics = {f"wd/{k}": float(v) for k, v in s.items()}
        for name, row in self.report["layers"].items():
            metrics |= {f"wd/{name}/{k}": float(row[k]) for k in ("s_mean", "s_max", "dilated_share")}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=0)
        if trainer.is_global_zero:  # every process dilates its student alike (trainer=ddp); one writes the file
            atomic_write_text(Path(trainer.default_root_dir) / self.filename, json.dumps(self.report, indent=2))
