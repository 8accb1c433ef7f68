"""Validated quantization specs: what to quantize, with how many bits, and how quantizers start.

`QuantizerSpec` describes one quantizer; `QuantSpec` describes a whole model and hands out the
per-layer `QuantizerSpec`s (8-bit for the layers in `keep_8bit`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

__all__ = ["QuantizerSpec", "QuantSpec", "MIN_BITS", "MAX_BITS", "module_matches"]

MIN_BITS = 2
MAX_BITS = 16
GRANULARITIES = ("tensor", "channel")
INITS = ("minmax", "mse", "lsq")
ACT_INITS = ("minmax", "mse")  # "lsq" is a weight init: activations start from calibration statistics


def _check_bits(name: str, value: Any) -> None:
    rule = f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} is not an integer: {rule}")
    if not MIN_BITS <= value <= MAX_BITS:
        raise ValueError(f"{name}={value} is out of range: {rule}")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        options = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name}={value!r} is invalid: allowed values are {options}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is invalid: must be a bool (true or false)")


def _from_dict(cls: type, d: dict[str, Any]) -> Any:
    if not isinstance(d, dict):
        raise TypeError(f"{cls.__name__}.from_dict expects a dict, got {type(d).__name__}")
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} key(s) {unknown}; allowed keys are {allowed}")
    return cls(**d)


@dataclass(frozen=True)
class QuantizerSpec:
    """How one uniform quantizer is set up.

    Args:
        bits: Bit-width, an integer in [2, 16].
        symmetric: Symmetric (zero-point 0, signed grid) instead of asymmetric (affine, unsigned grid).
        granularity: "tensor" (one step size) or "channel" (one per output channel, weights only).
        init: How the step size is initialised: "minmax" range, "mse" search over clipping ratios, or "lsq"
            (Esser et al. 2020: Δ = 2 mean|w| / sqrt(qmax) per row; weights on a symmetric grid only).
        learnable: Step size and zero-point are trainable `nn.Parameter`s (LSQ) instead of buffers.
        clip_first: Gradients as LSQ takes them, clamping to the grid before rounding (`fake_quant`); the forward
            value does not change.
    """

    bits: int
    symmetric: bool = False
    granularity: str = "tensor"
    init: str = "minmax"
    learnable: bool = True
    clip_first: bool = False

    def __post_init__(self) -> None:
        _check_bits("bits", self.bits)
        _check_bool("symmetric", self.symmetric)
        _check_choice("granularity", self.granularity, GRANULARITIES)
        _check_choice("init", self.init, INITS)
        if self.init == "lsq" and not self.symmetric:
            raise ValueError(
                "init='lsq' is for a symmetric grid (LSQ's Δ = 2 mean|w| / sqrt(Q_P) has no zero-point): set "
                "symmetric=True (in a config: quantizer.spec.weight_symmetric=true)"
            )
        _check_bool("learnable", self.learnable)
        _check_bool("clip_first", self.clip_first)

    @property
    def qmin(self) -> int:
        """Lowest integer of the grid."""
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        """Highest integer of the grid."""
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of the fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantizerSpec:
        """Build from a dict, rejecting unknown keys."""
        return _from_dict(cls, d)


def module_matches(pattern: str, name: str) -> bool:
    """Whether `pattern` (a module name or a glob) matches module `name` or a prefix of it up to a dot: `conv_in`,
    `time_embedding` and `*.resnets.0` match `conv_in`, `time_embedding.linear_1` and `down_blocks.0.resnets.0.conv1`.
    How `keep_8bit` entries (and the experiment scripts' quantizer names) select modules."""
    return fnmatchcase(name, pattern) or fnmatchcase(name, pattern + ".*")


# the activation quantizer each `QuantSpec` flag keeps switched off: the network input x_t, the output layer's input
FP_INPUT_QUANTIZERS: dict[str, str] = {
    "fp_network_input": "conv_in.act_quantizer",
    "fp_output_layer_input": "conv_out.act_quantizer",
}


@dataclass
class QuantSpec:
    """Quantization settings of a whole model.

    Args:
        weight_bits: Bit-width of weights.
        act_bits: Bit-width of layer input activations and of the attention q, k, v.
        weight_granularity: "channel" (per output channel) or "tensor".
        act_granularity: Only "tensor": activation quantizers are per tensor (per step under TPQ).
        weight_symmetric: Symmetric weight grid.
        act_symmetric: Symmetric activation grid.
        weight_init: "minmax", "mse" or "lsq" (LSQ's 2 mean|w| / sqrt(Q_P), symmetric grids only) initialisation
            of weight step sizes.
        act_init: "minmax" or "mse" initialisation of activation step sizes (from calibration).
        learnable: Step sizes and zero-points are trainable parameters.
        clip_first: Every quantizer takes its gradients as LSQ does, clamping to the grid before rounding: a value
            beyond the grid passes none (`dq.quant.fake_quant`). Off, rounding comes first, as in Q-Diffusion's and
            EfficientDM's code. Sampling is the same either way.
        keep_8bit: Module names (exact, a prefix up to a dot, or a glob such as `*.conv_shortcut`) whose weights
            and input activations are kept at 8 bits (at least; more when the configured bits are higher).
        attn_prob_bits: Bit-width of the post-softmax attention probabilities.
        quantize_attention: Quantize the attention matmul inputs (q, k, v, probabilities).
        split_concat: Give the skip half of an up-block `conv_shortcut`'s concatenated input its own activation
            quantizer (Q-Diffusion's shortcut splitting, `dq.quant.split`).
        fp_network_input: Leave the network input x_t (the input of `conv_in`) unquantized: its quantizer is built
            but switched off. Not the paper's setting (the first layer's input is 8-bit there); BENCHMARKS.md "Where the
            error comes from at W4A8".
        fp_output_layer_input: Leave the input of the output layer (`conv_out`) unquantized: its quantizer is built
            but switched off. EDA-DM's code, which DilateQuant's builds on, does this
            (`disable_network_output_quantization`); BENCHMARKS.md "The output layer's input".
    """

    weight_bits: int = 8
    act_bits: int = 8
    weight_granularity: str = "channel"
    act_granularity: str = "tensor"
    weight_symmetric: bool = False
    act_symmetric: bool = False
    weight_init: str = "minmax"
    act_init: str = "minmax"
    learnable: bool = True
    clip_first: bool = False
    keep_8bit: list[str] = field(default_factory=lambda: ["conv_in", "conv_out"])
    attn_prob_bits: int = 8
    quantize_attention: bool = True
    split_concat: bool = False
    fp_network_input: bool = False
    fp_output_layer_input: bool = False

    def __post_init__(self) -> None:
        _check_bits("weight_bits", self.weight_bits)
        _check_bits("act_bits", self.act_bits)
        _check_bits("attn_prob_bits", self.attn_prob_bits)
        _check_choice("weight_granularity", self.weight_granularity, GRANULARITIES)
        if self.act_granularity != "tensor":
            raise ValueError(
                f"act_granularity={self.act_granularity!r} is invalid: allowed values are 'tensor' "
                "(activation quantizers are per tensor, per sampling step under TPQ)"
            )
        _check_bool("weight_symmetric", self.weight_symmetric)
        _check_bool("act_symmetric", self.act_symmetric)
        _check_choice("weight_init", self.weight_init, INITS)
        _check_choice("act_init", self.act_init, ACT_INITS)
        if self.weight_init == "lsq" and not self.weight_symmetric:
            raise ValueError(
                "weight_init='lsq' is for a symmetric grid (LSQ's Δ = 2 mean|w| / sqrt(Q_P) has no zero-point): "
                "set weight_symmetric=true as well, or use weight_init=minmax or mse"
            )
        _check_bool("learnable", self.learnable)
        _check_bool("clip_first", self.clip_first)
        _check_bool("quantize_attention", self.quantize_attention)
        _check_bool("split_concat", self.split_concat)
        _check_bool("fp_network_input", self.fp_network_input)
        _check_bool("fp_output_layer_input", self.fp_output_layer_input)
        if isinstance(self.keep_8bit, str) or not all(isinstance(n, str) for n in self.keep_8bit):
            raise ValueError(f"keep_8bit={self.keep_8bit!r} is invalid: must be a list of module names")
        self.keep_8bit = list(self.keep_8bit)

    def fp_input_quantizers(self) -> dict[str, str]:
        """`{flag: quantizer name}` of the activation quantizers this spec keeps off (`fp_network_input`, ...)."""
        return {flag: name for flag, name in FP_INPUT_QUANTIZERS.items() if getattr(self, flag)}

    def is_kept_8bit(self, name: str) -> bool:
        """Whether module `name` is in `keep_8bit` (exact name, below a listed prefix, or matching a glob)."""
        return any(module_matches(k, name) for k in self.keep_8bit)

    def check_keep_8bit(self, layer_names: list[str], source: str = "QuantSpec.keep_8bit") -> None:
        """Raise if an entry of `keep_8bit` names none of `layer_names`, the model's quantizable layers (a typo, or
        an entry such as `time_proj` that holds no layer, would silently keep nothing at 8 bits); `source` says
        where the entries came from."""
        if unmatched := [k for k in self.keep_8bit if not any(module_matches(k, n) for n in layer_names)]:
            raise ValueError(
                f"keep_8bit entries {unmatched} name no quantizable layer of this model ({source}): use layer names "
                f"such as {layer_names[:3]}, a prefix up to a dot, or a glob such as '*.conv_shortcut'"
            )

    def weight_spec(self, name: str) -> QuantizerSpec:
        """Weight quantizer spec of layer `name`."""
        bits = max(self.weight_bits, 8) if self.is_kept_8bit(name) else self.weight_bits
        return QuantizerSpec(
            bits, self.weight_symmetric, self.weight_granularity, self.weight_init, self.learnable, self.clip_first
        )

    def act_spec(self, name: str) -> QuantizerSpec:
        """Input-activation quantizer spec of layer (or attention module) `name`."""
        bits = max(self.act_bits, 8) if self.is_kept_8bit(name) else self.act_bits
        return QuantizerSpec(bits, self.act_symmetric, "tensor", self.act_init, self.learnable, self.clip_first)

    def prob_spec(self, name: str) -> QuantizerSpec:
        """Post-softmax probability quantizer spec of attention module `name` (always asymmetric)."""
        return QuantizerSpec(self.attn_prob_bits, False, "tensor", self.act_init, self.learnable, self.clip_first)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of the fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantSpec:
        """Build from a dict (e.g. a Hydra config turned into a container), rejecting unknown keys."""
        return _from_dict(cls, d)
