"""Pluggable DilateQuant components as Lightning callbacks; removing one from the config is its ablation."""

from dq.callbacks.lora import QALoRA
from dq.callbacks.tpq import TemporalParallelQuantizer
from dq.callbacks.weight_dilation import WeightDilation, dilate_student

__all__ = ["QALoRA", "TemporalParallelQuantizer", "WeightDilation", "dilate_student"]
