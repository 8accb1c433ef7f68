"""Quantization core of dq: specs, quantizers, quantized layers and attention, the model swap, save/load.

Layers follow torchao: a validated spec (`QuantSpec`) → quantizer modules (`UniformQuantizer`,
`TemporalQuantizer`) → module swap (`QuantConv2d.from_float`, `QuantAttnProcessor`) → `quantize_model`.
"""

from dq.quant.attention import QuantAttnProcessor
from dq.quant.io import load_quantized, save_quantized
from dq.quant.layers import QuantConv2d, QuantLayerMixin, QuantLinear, quantized_weight_layers
from dq.quant.lora import LowRankDelta, adapter, add_lora, lora_layers, merge_lora, stored_weight
from dq.quant.model import (
    QuantReport,
    QuantRow,
    act_quantizers,
    calibrate_activations,
    expand_act_quantizers,
    is_quantized,
    quant_modules,
    quant_report,
    quant_spec,
    quantize_model,
    same_timesteps,
    set_quant_state,
    set_timesteps,
    step_context,
    timestep_table,
    timestep_to_index,
    weight_quantizers,
)
from dq.quant.quantizer import (
    NonFiniteActivationError,
    StepContext,
    TemporalQuantizer,
    UniformQuantizer,
    fake_quant,
    round_ste,
)
from dq.quant.spec import QuantizerSpec, QuantSpec

__all__ = [
    "LowRankDelta",
    "NonFiniteActivationError",
    "QuantAttnProcessor",
    "QuantConv2d",
    "QuantLayerMixin",
    "quantized_weight_layers",
    "QuantLinear",
    "QuantReport",
    "QuantRow",
    "QuantSpec",
    "QuantizerSpec",
    "StepContext",
    "TemporalQuantizer",
    "UniformQuantizer",
    "act_quantizers",
    "adapter",
    "add_lora",
    "calibrate_activations",
    "expand_act_quantizers",
    "fake_quant",
    "is_quantized",
    "load_quantized",
    "lora_layers",
    "merge_lora",
    "quant_modules",
    "quant_report",
    "quant_spec",
    "quantize_model",
    "round_ste",
    "same_timesteps",
    "save_quantized",
    "set_quant_state",
    "set_timesteps",
    "step_context",
    "stored_weight",
    "timestep_table",
    "timestep_to_index",
    "weight_quantizers",
]
