"""Distillation of quantized diffusion models: calibration data, block partition, and the LightningModules
(`BlockwiseDistillation` for DilateQuant's BKD, `ModelDistillation` for whole-model QAT, `NoDistillation` for PTQ).

Nothing here imports `dq.student` (which imports `dq.distill.calibration`), so there is no import cycle.
"""

from dq.distill.base import (
    NoDistillation,
    NonFiniteLossError,
    QuantDistillation,
    RelativeAdam,
    calibrate_student,
    lr_factor,
    param_groups,
)
from dq.distill.bkd import BlockwiseDistillation
from dq.distill.blocks import Block, BlockIO, capture_block_io, partition_blocks, run_block
from dq.distill.calibration import CalibrationSet, get_calibration_set
from dq.distill.checkpoint import load_block_checkpoint, save_block_checkpoint
from dq.distill.model_kd import ModelDistillation

__all__ = [
    "Block",
    "BlockIO",
    "BlockwiseDistillation",
    "CalibrationSet",
    "ModelDistillation",
    "NoDistillation",
    "NonFiniteLossError",
    "QuantDistillation",
    "RelativeAdam",
    "calibrate_student",
    "capture_block_io",
    "get_calibration_set",
    "load_block_checkpoint",
    "lr_factor",
    "param_groups",
    "partition_blocks",
    "run_block",
    "save_block_checkpoint",
]
