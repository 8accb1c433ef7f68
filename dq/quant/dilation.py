"""Weight Dilation (WD, DilateQuant section 1): per-input-channel equivalent scaling `Y = (X / s) * (s · W)`.

Weight quantizers are per **output** row, so only the input channels that hold a row's max or min fix that
row's range. Every other input channel `k` is stretched by `s_k ≥ 1` until one of its entries touches its row
bound: the row ranges (hence Δ_w, z_w) stay exactly the same while the activation the layer sees, `X / s`,
shrinks. `s` depends on the full-precision weights alone and is computed once, before training.

Besides the math (`dilation_factors`, `dilate_`), this module knows which layers of a diffusers UNet share one
input and so must share one `s` (`shared_input_groups`), and where `1/s` could be folded at export time
(`fold_report`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dq.quant.attention import QuantAttnProcessor
from dq.quant.lora import adapter, stored_weight

__all__ = ["dilate_", "dilation_factors", "fold_report", "layer_names", "shared_input_groups"]

_MAX_NUDGES = 8  # rounds of one-ulp lowering of s; one is almost always enough


def _as_list(weights: Tensor | Sequence[Tensor]) -> list[Tensor]:
    ws = [weights] if isinstance(weights, Tensor) else list(weights)
    if not ws:
        raise ValueError("dilation_factors needs at least one weight.")
    c_in, dtype = ws[0].shape[1:2], ws[0].dtype  # shape[1:2]: C_in as a 1-tuple, () for a malformed 1-D weight
    for i, w in enumerate(ws):
        if w.dim() not in (2, 3, 4, 5):
            raise ValueError(f"weights[{i}] has shape {tuple(w.shape)}; expected [C_out, C_in, *kernel].")
        if w.shape[1:2] != c_in:
            raise ValueError(f"weights share one input but have C_in {c_in[0]} and {w.shape[1]} (weights[{i}]).")
        if w.dtype != dtype or not w.is_floating_point():
            raise ValueError(f"weights[{i}] has dtype {w.dtype}; all weights of a group must share one float dtype.")
        if not torch.isfinite(w).all():
            raise ValueError(f"weights[{i}] holds inf or NaN; cannot compute dilation factors.")
    return ws


def _columns_3d(w: Tensor) -> Tensor:
    """`[C_out, C_in, *kernel]` → `[C_out, C_in, K]`: kernel positions (K = 1 for linear) are more column entries."""
    return w.reshape(w.shape[0], w.shape[1], -1)


def _column_bounds(w: Tensor) -> Tensor:
    """Largest factor each input column of `w` can take without moving any row bound, float64 [C_in]."""
    w = _columns_3d(w.detach().to(torch.float64))  # [C_out, C_in, K]
    row_max = w.amax(dim=(1, 2), keepdim=True)  # [C_out, 1, 1]  M_j
    row_min = w.amin(dim=(1, 2), keepdim=True)  # [C_out, 1, 1]  m_j
    ratio = torch.where(w > 0, row_max / w, torch.where(w < 0, row_min / w, float("inf")))  # [C_out, C_in, K]
    # An entry holding its row's max or min saturates its column. Same as the formula for mixed-sign rows
    # (M_j / M_j = 1); in a one-signed row it also pins the bound nearest zero (e.g. the max of an all-negative row).
    ratio = torch.where(((w == row_max) | (w == row_min)) & (w != 0), 1.0, ratio)  # zero entries stay unbounded
    return ratio.amin(dim=(0, 2))  # [C_in]; inf where the column has no non-zero entry


def _expand(s: Tensor, w: Tensor) -> Tensor:
    """View `s` [C_in] so that it broadcasts over the input-channel dim of `w` [C_out, C_in, *kernel]."""
    return s.view(1, -1, *([1] * (w.dim() - 2)))


def dilation_factors(weights: Tensor | Sequence[Tensor], s_max: float = 1e4) -> Tensor:
    """Dilation factors `s` [C_in] of one weight, or one shared `s` for several weights that read one input.

    For each output row `j` (``M_j``/``m_j`` = row max/min over input channels and kernel positions), column
    `k` may grow until an entry touches its row bound::

        s_k = min( min over W[j,k,…] > 0 of M_j / W[j,k,…],  min over W[j,k,…] < 0 of m_j / W[j,k,…] )

    Zero entries impose no bound, a column with no non-zero entry gets 1, and `s` is clipped to `[1, s_max]`.
    Saturated columns, holding some row's max or min, get exactly 1: for mixed-sign rows that is what the formula
    gives; for a one-signed row (all entries ≥ 0 or ≤ 0) the formula alone would let the entry nearest zero move,
    so its column is pinned too. Several weights sharing one input (attention q/k/v) take the element-wise
    minimum of their bounds. Computed in float64; after the cast to the weight dtype, a factor is lowered by an
    ulp wherever `s_k · W` in that dtype would round past a row bound, so `dilate_` leaves every row's min and
    max bit-for-bit unchanged.

    Args:
        weights: one weight or a sequence of weights `[C_out, C_in, *kernel]` with the same `C_in` and dtype.
        s_max: upper clip of `s` (≥ 1).

    Returns:
        `s` of shape `[C_in]`, dtype and device of the weights.

    Raises:
        ValueError: bad `s_max`, shapes that do not share `C_in`, mixed dtypes, or non-finite weights.
        ArithmeticError: the one-ulp reductions could not keep every row range (never seen in float32).
    """
    if not s_max >= 1.0:
        raise ValueError(f"s_max must be >= 1, got {s_max}.")
    ws = _as_list(weights)
    bound = torch.stack([_column_bounds(w) for w in ws]).amin(dim=0)  # [C_in] float64
    bound = torch.where(torch.isinf(bound), torch.ones_like(bound), bound)  # all-zero column → 1
    s = bound.clamp(1.0, s_max).to(ws[0].dtype)  # saturated columns: M_j / M_j == 1 exactly
    # Rounding guard: s·W evaluated exactly as dilate_ will (in the weight dtype) must stay inside every row range.
    for _ in range(_MAX_NUDGES):
        if not (over := _crosses_row_range(ws, s)).any():
            return s
        s = torch.where(over, torch.nextafter(s, torch.zeros_like(s)).clamp_min(1.0), s)
    if (over := _crosses_row_range(ws, s)).any():
        raise ArithmeticError(
            f"dilation factors of input channels {over.nonzero().flatten().tolist()[:8]} still push a weight past "
            f"its row's range after {_MAX_NUDGES} one-ulp reductions (weights {ws[0].dtype}): the row ranges, and "
            "with them the weight quantizers' step sizes, would change"
        )
    return s


def _crosses_row_range(ws: list[Tensor], s: Tensor) -> Tensor:
    """[C_in] bool: input channels where some `s_k · W` entry, rounded in the weight dtype as `dilate_` rounds it,
    lies outside its output row's [min, max]."""
    over = torch.zeros_like(s, dtype=torch.bool)
    for w in ws:
        w3 = _columns_3d(w.detach())  # [C_out, C_in, K]
        d = w3 * s.view(1, -1, 1)
        hi, lo = w3.amax(dim=(1, 2), keepdim=True), w3.amin(dim=(1, 2), keepdim=True)  # [C_out, 1, 1]
        over |= ((d > hi) | (d < lo)).any(dim=2).any(dim=0)
    return over


def dilate_(layers: Sequence[nn.Module], s_max: float = 1e4) -> Tensor:
    """Dilate, in place, the layers that read one input with one shared `s`, and install `1/s` on their input.

    Each layer's `weight` (conv `[C_out, C_in, kh, kw]` or linear `[C_out, C_in]`) gets input channel `k`
    multiplied by `s_k`. A layer with an `in_scale` buffer `[C_in]` (applied to the input before the activation
    quantizer) gets `in_scale *= 1/s`; a layer with a `weight_quantizer` exposing `init_from(weight)` is
    re-initialised from the dilated weight (its per-row range is unchanged). Plain `nn.Conv2d`/`nn.Linear`
    have no `in_scale`: their caller must divide the input by `s` itself, or the layer's function changes.

    Args:
        layers: modules with a `weight` attribute, all reading the same input.
        s_max: upper clip of `s`.

    Returns:
        The shared `s` `[C_in]`.

    Raises:
        ValueError: no layers, a grouped convolution, or an `in_scale` whose size is not `C_in`.
    """
    layers = list(layers)
    if not layers:
        raise ValueError("dilate_ needs at least one layer.")
    for layer in layers:
        if getattr(layer, "groups", 1) != 1:
            raise ValueError(f"{type(layer).__name__} has groups={layer.groups}; dilation needs groups=1.")
    s = dilation_factors([layer.weight for layer in layers], s_max)
    inv = 1.0 / s.to(torch.float64)  # [C_in]
    with torch.no_grad():
        for layer in layers:
            # in place on the Parameters, not .data: their version counters key the fake-quantized weight's cache
            w = stored_weight(layer)  # under an adapter (QALoRA) the adapted W ...
            w.mul_(_expand(s.to(w.device, w.dtype), w))
            if (delta := adapter(layer)) is not None:  # ... and A's input columns: W s + B (A s) = (W + B A) s
                delta.A.view(-1, *w.shape[1:]).mul_(_expand(s.to(w.device, w.dtype), w))
            in_scale = getattr(layer, "in_scale", None)
            if in_scale is not None:
                if in_scale.numel() != s.numel():
                    raise ValueError(f"in_scale has {in_scale.numel()} entries, the weight has C_in={s.numel()}.")
                in_scale.mul_(inv.to(in_scale.device, in_scale.dtype).view_as(in_scale))
            quantizer = getattr(layer, "weight_quantizer", None)
            if quantizer is not None and callable(getattr(quantizer, "init_from", None)):
                quantizer.init_from(w)
    return s


def _is_layer(module: nn.Module) -> bool:
    """A weight layer dilation applies to: Conv2d/Linear, or a quantized layer (`weight_quantizer`), 2D/4D weight."""
    w = getattr(module, "weight", None)
    if not isinstance(w, Tensor) or w.dim() not in (2, 4):
        return False
    return isinstance(module, nn.Conv2d | nn.Linear) or hasattr(module, "weight_quantizer")


def layer_names(model: nn.Module) -> list[str]:
    """Names of the dilatable layers of `model`, in `named_modules` order (children of a matched layer skipped)."""
    names: list[str] = []
    for name, module in model.named_modules():
        if names and name.startswith(names[-1] + "."):
            continue  # e.g. an original float module kept inside a quantized wrapper
        if _is_layer(module):
            names.append(name)
    return names


def _is_attention(module: nn.Module) -> bool:
    return all(hasattr(module, attr) for attr in ("to_q", "to_k", "to_v", "is_cross_attention"))


def shared_input_groups(unet: nn.Module) -> list[list[str]]:
    """Layer names grouped by the input they read; each group must share one dilation factor `s`.

    Within a diffusers `Attention`, self-attention's `to_q`, `to_k`, `to_v` form one group; in cross-attention
    `to_k`, `to_v` share `encoder_hidden_states` and `to_q` is alone. Every other layer is its own group.
    Works on float UNets and after the swap to quantized layers.

    Args:
        unet: a diffusers `UNet2DModel` / `UNet2DConditionModel` (or any module tree).

    Returns:
        Groups in `named_modules` order; every dilatable layer appears in exactly one group.
    """
    key_of: dict[str, tuple[str, str]] = {}  # layer name → shared-input key
    for name, module in unet.named_modules():
        if not _is_attention(module):
            continue
        prefix = f"{name}." if name else ""
        shared = ("to_k", "to_v") if module.is_cross_attention else ("to_q", "to_k", "to_v")
        for proj in shared:
            key_of[prefix + proj] = (name, "kv" if module.is_cross_attention else "qkv")
    groups: dict[tuple[str, str], list[str]] = {}
    for name in layer_names(unet):
        groups.setdefault(key_of.get(name, (name, "")), []).append(name)
    return list(groups.values())


@dataclass(frozen=True)
class _FoldRule:
    pattern: str  # regex on the layer name; group `base` anchors the producer path
    producer: str | None  # producer path template ("{base}.norm1"), None: not foldable
    reason: str  # why (for a producer: what it is)
    cross: bool | None = None  # only for layers in a cross- (True) / self- (False) attention; None: any
    v_quantized: bool | None = None  # only in an attention whose V is (True) / is not (False) quantized; None: any


# First matching rule wins. A rule with a producer applies only if that module exists and has an affine
# (`weight`); otherwise the next matching rule is tried.
_FOLD_RULES: tuple[_FoldRule, ...] = (
    _FoldRule(r"(?P<base>.*)\.to_[kv]$", "{base}.norm_cross", "norm_cross affine on encoder_hidden_states", True),
    _FoldRule(
        r"\.to_[kv]$",
        None,
        "input is encoder_hidden_states, an external model input (no producer inside the UNet)",
        True,
    ),
    _FoldRule(r"(?P<base>.*)\.to_[qkv]$", "{base}.group_norm", "the attention's GroupNorm affine"),
    _FoldRule(r"(?P<base>.*)\.attn1\.to_[qkv]$", "{base}.norm1", "the transformer block's norm1 affine"),
    _FoldRule(r"(?P<base>.*)\.attn2\.to_[qkv]$", "{base}.norm2", "the transformer block's norm2 affine"),
    _FoldRule(
        r"\.to_out\.0$",
        None,
        "V is quantized before probs @ V (dq's attention processor): folded into to_v, V's quantizer would see V / s",
        v_quantized=True,
    ),
    _FoldRule(r"(?P<base>.*)\.to_out\.0$", "{base}.to_v", "to_v output rows: probs @ V is linear per channel of V"),
    _FoldRule(r"(?P<base>.*)\.proj_in$", "{base}.norm", "the transformer's GroupNorm affine"),
    _FoldRule(r"(?P<base>.*)\.ff\.net\.0\.proj$", "{base}.norm3", "the transformer block's norm3 affine"),
    _FoldRule(r"\.ff\.net\.2$", None, "after GEGLU/GELU (non-linear)"),
    _FoldRule(r"\.proj_out$", None, "input is the residual stream (sum of block outputs), no single affine producer"),
    _FoldRule(r"\.conv[12]$", None, "after SiLU"),
    _FoldRule(r"\.time_emb_proj$", None, "after SiLU of the time embedding"),
    _FoldRule(r"\.conv_shortcut$", None, "block input (previous block output / skip concat), no affine producer"),
    _FoldRule(r"samplers\.\d+\.conv$", None, "input is the residual stream (resampled), no affine producer"),
    _FoldRule(r"^conv_in$", None, "model input"),
    _FoldRule(r"^conv_out$", None, "after SiLU (conv_act)"),
    _FoldRule(r"^time_embedding\.linear_1$", None, "input is the sinusoidal timestep embedding, not an affine op"),
    _FoldRule(r"^time_embedding\.linear_2$", None, "after SiLU"),
)
_NOT_FOLDABLE = "not foldable: {reason}; 1/s stays a per-channel multiply in the quantize step"


def _parent_attention(unet: nn.Module, name: str) -> nn.Module | None:
    """The attention module that holds layer `name` (`to_q`, or `to_out.0` two levels down), if any."""
    parent = name.rpartition(".")[0]
    while parent:
        if _is_attention(module := unet.get_submodule(parent)):
            return module
        parent = parent.rpartition(".")[0]
    return None


def fold_report(unet: nn.Module) -> dict[str, str]:
    """Where each layer's `1/s` could be folded at export: the honest cost of Weight Dilation.

    `1/s` can be folded into an affine producer of the layer's input when nothing non-linear sits in between
    (a norm's affine, `to_v`'s output rows for `to_out.0` while V is not quantized); behind SiLU, GEGLU, a residual
    sum, a model input or a quantized V it cannot, and stays a per-channel multiply in the quantize step.

    Args:
        unet: a diffusers `UNet2DModel` / `UNet2DConditionModel`, float or quantized.

    Returns:
        `{layer name: "foldable into <producer> (<what>)" | "not foldable: <why>; …"}` for every dilatable layer.
    """
    report: dict[str, str] = {}
    for name in layer_names(unet):
        attn = _parent_attention(unet, name)
        cross = bool(attn.is_cross_attention) if attn is not None else None
        v_quantized = isinstance(getattr(attn, "processor", None), QuantAttnProcessor) if attn is not None else None
        report[name] = _NOT_FOLDABLE.format(reason="no fold rule for this layer")
        for rule in _FOLD_RULES:
            match = re.search(rule.pattern, name)
            if match is None or (rule.cross is not None and rule.cross != cross):
                continue
            if rule.v_quantized is not None and rule.v_quantized != v_quantized:
                continue
            if rule.producer is None:
                report[name] = _NOT_FOLDABLE.format(reason=rule.reason)
                break
            producer = rule.producer.format(base=match.group("base"))
            try:
                module = unet.get_submodule(producer)
            except AttributeError:
                continue
            if getattr(module, "weight", None) is not None:
                report[name] = f"foldable into {producer} ({rule.reason})"
                break
    return report
