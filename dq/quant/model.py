"""Model-level workflow: `quantize_model` swaps a diffusers UNet's layers in place, maps timesteps to TPQ step
indices, and offers helpers to find, switch, calibrate and expand its quantizers."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from torch import Tensor, nn

from dq.quant.attention import QuantAttnProcessor
from dq.quant.layers import QuantConv2d, QuantLayerMixin, QuantLinear
from dq.quant.quantizer import NonFiniteActivationError, StepContext, TemporalQuantizer, UniformQuantizer
from dq.quant.spec import QuantSpec
from dq.quant.split import concat_splits

__all__ = [
    "check_attention_processors",
    "QuantReport",
    "QuantRow",
    "quantizable_layers",
    "quantize_model",
    "quant_report",
    "quant_modules",
    "act_quantizers",
    "weight_quantizers",
    "set_quant_state",
    "step_context",
    "quant_spec",
    "set_timesteps",
    "timestep_to_index",
    "expand_act_quantizers",
    "calibrate_activations",
    "is_quantized",
]

FilterFn = Callable[[nn.Module, str], bool]
TIMESTEP_ATOL = 1e-3  # a timestep matches a table entry within this distance (float timesteps)
TIMESTEPS_BUFFER = "dq_timesteps"  # [T] the sampler's timestep table; step index i = position in it


@dataclass
class QuantRow:
    """One quantized matmul of the model.

    For `kind == "attn-matmul"` the left operand (q, or the probabilities) takes the `act_bits` column and the
    right operand (k, or v) the `weight_bits` column.
    """

    name: str
    kind: str  # "conv" | "linear" | "attn-matmul"
    weight_bits: int | None
    act_bits: int | None  # None: activations not quantized
    quantizer: str  # activation quantizer kind: "shared" | "temporal(T)"
    split: int = 0  # input channel where a skip concatenation gets its own activation quantizer (0: none)


@dataclass
class QuantReport:
    """What `quantize_model` quantized: one row per conv / linear layer and per attention matmul."""

    rows: list[QuantRow] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[QuantRow]:
        return iter(self.rows)

    def summary(self) -> dict[str, int]:
        """Counts: rows per kind, per activation-quantizer kind, and the total."""
        counts: Counter[str] = Counter()
        for r in self.rows:
            counts[r.kind] += 1
            counts[r.quantizer] += 1
            if r.split:
                counts["split"] += 1
        return {"total": len(self.rows), **dict(counts)}

    def __str__(self) -> str:
        header = ("layer", "kind", "W bits", "A bits", "act quantizer")
        body = [
            (
                r.name,
                r.kind,
                "-" if r.weight_bits is None else str(r.weight_bits),
                str(r.act_bits or "-"),
                r.quantizer + (f", split at channel {r.split}" if r.split else ""),
            )  # fmt: skip
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *body]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(", ".join(f"{k}: {v}" for k, v in self.summary().items()))
        return "\n".join(lines)


# ---- lookup helpers -------------------------------------------------------------------------------------------
def quant_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every quantized layer (`QuantConv2d`, `QuantLinear`) and `QuantAttnProcessor`."""
    for name, m in model.named_modules():
        if isinstance(m, QuantLayerMixin | QuantAttnProcessor):
            yield name, m


def act_quantizers(model: nn.Module) -> Iterator[tuple[str, TemporalQuantizer]]:
    """(name, quantizer) of every activation quantizer, attention q/k/v/probabilities included."""
    for name, m in model.named_modules():
        if isinstance(m, TemporalQuantizer):
            yield name, m


def has_per_step_ranges(model: nn.Module) -> bool:
    """Whether any activation quantizer keeps one range per sampling step (TPQ): only those tie the model to its
    timestep table."""
    return any(q.num_steps > 1 for _, q in act_quantizers(model))


def weight_quantizers(model: nn.Module) -> Iterator[tuple[str, UniformQuantizer]]:
    """(name, quantizer) of every weight quantizer."""
    for name, m in model.named_modules():
        if isinstance(m, UniformQuantizer):
            yield name, m


def is_quantized(model: nn.Module) -> bool:
    """Whether `quantize_model` was applied to `model`."""
    return isinstance(getattr(model, "_dq_step_context", None), StepContext)


def _require_quantized(model: nn.Module) -> None:
    if not is_quantized(model):
        raise ValueError("model is not quantized: call quantize_model(model, spec) first")


def step_context(model: nn.Module) -> StepContext:
    """The StepContext shared by all temporal quantizers of a quantized model."""
    _require_quantized(model)
    return model._dq_step_context


def quant_spec(model: nn.Module) -> QuantSpec:
    """The QuantSpec a model was quantized with."""
    _require_quantized(model)
    return model._dq_spec


def set_quant_state(model: nn.Module, weights: bool = True, acts: bool = True) -> None:
    """Enable or disable weight and activation (incl. attention) quantization (the quantizers that
    `fp_network_input` / `fp_output_layer_input` keep off stay off; that needs the whole quantized model: on a single
    layer every quantizer follows the flags)."""
    kept_off = set(quant_spec(model).fp_input_quantizers().values()) if is_quantized(model) else set()
    for _, q in weight_quantizers(model):
        q.enabled = weights
    for name, q in act_quantizers(model):
        q.enabled = acts and name not in kept_off


# ---- timesteps --------------------------------------------------------------------------------------------------
def timestep_to_index(table: Tensor, timestep: Tensor | float | int, batch_size: int) -> Tensor:
    """Step index of each sample: the position of its timestep in `table`.

    Args:
        table: [T] the sampler's timesteps.
        timestep: Scalar or [B] timesteps (int or float).
        batch_size: B.

    Returns:
        [B] long tensor on the table's device.

    Raises:
        ValueError: A timestep is not in the table.
    """
    t = torch.as_tensor(timestep, device=table.device).reshape(-1)
    if t.numel() == 1:
        t = t.expand(batch_size)
    if t.shape[0] != batch_size:
        raise ValueError(f"got {t.shape[0]} timesteps for a batch of {batch_size} samples")
    match = (t.float()[:, None] - table.float()[None, :]).abs() <= TIMESTEP_ATOL  # [B, T]
    found = match.any(dim=1)
    if not bool(found.all()):
        bad = sorted(set(t[~found].tolist()))
        raise ValueError(
            f"timestep {bad[0] if len(bad) == 1 else bad} is not in the timestep table this quantized model was "
            f"built for: {table.tolist()}. Its per-step quantizers hold one range per step of that table: sample with "
            f"num_inference_steps={table.numel()} and the scheduler config it was calibrated with."
        )
    return match.int().argmax(dim=1)


def _step_index_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    """Forward pre-hook of a quantized UNet: sets the StepContext index from `forward(sample, timestep, ...)`."""
    check_attention_processors(module)
    ctx: StepContext = module._dq_step_context
    table: Tensor | None = getattr(module, TIMESTEPS_BUFFER)
    if table is None or not has_per_step_ranges(module):
        ctx.index = None  # no table, or shared ranges only: any schedule samples alike
        return None
    sample = args[0] if len(args) > 0 else kwargs.get("sample")
    timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
    if sample is None or timestep is None:
        raise TypeError("a quantized UNet is called as unet(sample, timestep, ...): its per-step quantizers need both")
    if table.is_floating_point() and table.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"this quantized model's timestep table was cast to {table.dtype} (model.to(dtype)), which rounds "
            f"fractional timesteps: keep it in float32 (`{TIMESTEPS_BUFFER}` buffer) or quantize with an integer table"
        )
    ctx.index = timestep_to_index(table, timestep, sample.shape[0])
    return None


def check_attention_processors(model: nn.Module) -> None:
    """Raise if an attention module `quantize_model` gave a `QuantAttnProcessor` now has another processor:
    diffusers' `set_attention_slice` / `enable_attention_slicing`, `fuse_qkv_projections` and `set_attn_processor`
    swap it for a float one, which would silently drop attention quantization."""
    for name in getattr(model, "_dq_quant_attention", ()):
        proc = model.get_submodule(name).processor
        if not isinstance(proc, QuantAttnProcessor):
            raise TypeError(
                f"attention {name!r} of this quantized model runs {type(proc).__name__}, not dq's QuantAttnProcessor "
                "(set by set_attention_slice / enable_attention_slicing, fuse_qkv_projections or set_attn_processor?): "
                "its attention would run unquantized. Quantized attention keeps its own processor; reload the model "
                "(dq.quant.load_quantized) to get it back."
            )


def set_timesteps(model: nn.Module, timesteps: Tensor | Sequence[int | float] | None) -> None:
    """Store the sampler's timestep table (step index i = position i) on a quantized model, or clear it.

    Once per-step quantizers hold T steps, the table must have T entries; once they are calibrated it can only be
    set to the table they were calibrated for (another order or other timesteps would pick other steps' ranges), and
    not cleared.
    """
    _require_quantized(model)
    table = None
    calibrated = any(q.num_steps > 1 and q.initialized for _, q in act_quantizers(model))
    if timesteps is None and calibrated and getattr(model, TIMESTEPS_BUFFER, None) is not None:
        raise ValueError(
            "this model's per-step quantizers are calibrated for its timestep table: clearing it would let any "
            "table be set next and give each step another step's ranges. Keep the table (sample with its schedule)"
        )
    if timesteps is not None:
        table = torch.as_tensor(timesteps).detach().clone().reshape(-1)
        if table.numel() == 0:
            raise ValueError("timesteps is empty: give the sampler's timestep table, e.g. scheduler.timesteps")
        if repeated := sorted(v for v, n in Counter(table.cpu().tolist()).items() if n > 1):
            raise ValueError(
                f"the timestep table repeats {repeated}: a step index is found by its timestep, so a repeated one "
                "(as in diffusers' PNDM table) would give its later steps the first one's ranges. Use a sampler whose "
                "steps are distinct timesteps (DDIM, DDPM, Euler)"
            )
        old = getattr(model, TIMESTEPS_BUFFER, None)
        temporal = [q for _, q in act_quantizers(model) if q.num_steps > 1]
        if temporal and table.numel() != temporal[0].num_steps:
            raise ValueError(
                f"the model's per-step quantizers hold {temporal[0].num_steps} steps and the table has "
                f"{table.numel()} timesteps: give the table of {temporal[0].num_steps} steps they were built for"
            )
        if calibrated and old is not None and not same_timesteps(old, table):
            raise ValueError(
                f"this model's per-step quantizers were calibrated for the timesteps {old.tolist()}: another "
                "table would give each step another step's ranges. Sample with that schedule, or quantize and "
                "calibrate again for the new one."
            )
        device = next(model.parameters()).device
        table = table.to(device)
    model.register_buffer(TIMESTEPS_BUFFER, table)


def timestep_table(model: nn.Module) -> Tensor | None:
    """The sampler's timestep table stored on a quantized model (`set_timesteps`), or None."""
    _require_quantized(model)
    return getattr(model, TIMESTEPS_BUFFER, None)


def same_timesteps(a: Tensor, b: Tensor) -> bool:
    """Whether two timestep tables hold the same timesteps in the same order (on any devices)."""
    return a.numel() == b.numel() and bool((a.cpu().double() - b.cpu().double()).abs().max() <= TIMESTEP_ATOL)


def expand_act_quantizers(model: nn.Module, num_steps: int | None = None) -> None:
    """Turn every shared activation quantizer into a per-step one (TPQ); T defaults to the timestep table length."""
    if num_steps is None:
        table = getattr(model, TIMESTEPS_BUFFER, None)
        if table is None:
            raise ValueError("num_steps not given and the model has no timestep table (quantize_model(timesteps=))")
        num_steps = table.numel()
    elif (table := getattr(model, TIMESTEPS_BUFFER, None)) is not None and num_steps not in (1, table.numel()):
        raise ValueError(
            f"num_steps={num_steps}, and the model's timestep table has {table.numel()} entries: each step of the "
            "table needs its own quantizer step (leave num_steps out to use the table's length)"
        )
    for _, q in act_quantizers(model):
        q.expand_steps(num_steps)


@contextmanager
def calibrate_activations(model: nn.Module, force: bool = False, pooled: bool = False) -> Iterator[list[str]]:
    """Observe activations of the forward passes run inside the block, then initialise the quantizers.

    Uninitialised activation quantizers (all of them with `force=True`) record per-step statistics and pass
    their inputs through; on exit each one's (Δ, z) is set from its statistics (`pooled`: every step from those of
    all steps together). Yields the list of observed quantizer names; on normal exit, names that saw no input are
    removed from it (they stay uninitialised).
    """
    chosen = [(n, q) for n, q in act_quantizers(model) if force or not q.initialized]
    names = [n for n, _ in chosen]
    for _, q in chosen:
        q.start_observation()
    try:
        yield names
    except BaseException as err:
        for _, q in chosen:
            q.observing = False
            q._reset_stats()
        if isinstance(err, NonFiniteActivationError) and err.quantizer is not None:  # name it; the new error has none
            name = next(n for n, q in chosen if q is err.quantizer)
            raise NonFiniteActivationError(f"activation quantizer {name}: {err}") from err
        raise
    unseen = {n for n, q in chosen if not q.finish_observation(pooled)}
    names[:] = [n for n in names if n not in unseen]


# ---- the swap ------------------------------------------------------------------------------------------------
def quant_report(model: nn.Module) -> QuantReport:
    """Report of the quantized layers and attention matmuls of a quantized model, in module order."""

    def kind_of(q: TemporalQuantizer) -> str:
        return "shared" if q.num_steps == 1 else f"temporal({q.num_steps})"

    rows = []
    for name, m in quant_modules(model):
        if isinstance(m, QuantAttnProcessor):
            q, k, v, p = m.q_quantizer, m.k_quantizer, m.v_quantizer, m.prob_quantizer
            rows.append(QuantRow(f"{name}[q@k]", "attn-matmul", k.bits, q.bits, kind_of(q)))
            rows.append(QuantRow(f"{name}[p@v]", "attn-matmul", v.bits, p.bits, kind_of(p)))
        else:
            kind = "conv" if isinstance(m, QuantConv2d) else "linear"
            a_bits = m.act_quantizer.bits if m.act_quantizer.enabled else None  # off: fp_network_input, ...
            w_bits = m.weight_quantizer.bits
            rows.append(QuantRow(name, kind, w_bits, a_bits, kind_of(m.act_quantizer), m.split))
    return QuantReport(rows)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantizable_layers(unet: nn.Module) -> list[str]:
    """Names of the modules `quantize_model` can quantize (convs, linears, attention), in module order."""
    return [name for name, m in unet.named_modules() if isinstance(m, nn.Conv2d | nn.Linear | Attention)]


def _save_pretrained_refused(*args: object, **kwargs: object) -> None:
    """A quantized model's `save_pretrained` (also the one a pipeline's `save_pretrained` calls): refused with the
    way that works. diffusers' own would write plain weights that load back as a float UNet, without a word."""
    raise TypeError(
        "this UNet is quantized by dq: save it with dq.quant.save_quantized(unet, directory) and load it with "
        "dq.quant.load_quantized(directory); diffusers' save_pretrained would drop the quantizers"
    )


def quantize_model(
    unet: nn.Module,
    spec: QuantSpec,
    timesteps: Tensor | Sequence[int | float] | None = None,
    filter_fn: FilterFn | None = None,
    *,
    init_weights: bool = True,
) -> QuantReport:
    """Quantize a diffusers UNet in place.

    Every `nn.Conv2d` / `nn.Linear` becomes a `QuantConv2d` / `QuantLinear` (weight quantizers initialised from the
    weights now, activation quantizers shared and uninitialised until calibration) and, with
    `spec.quantize_attention`, every `Attention` gets a `QuantAttnProcessor`. The model keeps its class, so stock
    diffusers pipelines run it unchanged.

    Args:
        unet: A `UNet2DModel`, `UNet2DConditionModel` or any module built from diffusers blocks.
        spec: Bits and quantizer settings.
        timesteps: The sampler's timestep table (e.g. `scheduler.timesteps` after `set_timesteps(T)`); each sample's
            timestep is mapped to its position in it (TPQ step index). None: no step indices (shared quantizers only).
        filter_fn: `filter_fn(module, name) -> bool`; layers / attention modules for which it is False stay float.
        init_weights: Initialise weight quantizers from the weights (False when a state dict loaded next sets them,
            as in `load_quantized`).

    Returns:
        The report of what was quantized.
    """
    if is_quantized(unet) or any(True for _ in quant_modules(unet)):
        raise ValueError("model is already quantized")
    modules = list(unet.named_modules())
    spec.check_keep_8bit(quantizable_layers(unet))  # before anything is changed
    keep = filter_fn if filter_fn is not None else (lambda module, name: True)
    by_name = dict(modules)
    for flag, quantizer in spec.fp_input_quantizers().items():
        layer = quantizer.rpartition(".")[0]
        if not isinstance(by_name.get(layer), nn.Conv2d | nn.Linear) or not keep(by_name[layer], layer):
            raise ValueError(f"{flag}=true needs a quantized `{layer}`, and this model would have no {quantizer}")
    ctx = StepContext()
    unet._dq_step_context = ctx
    unet._dq_spec = spec
    unet._dq_quant_attention = []  # attention modules given a QuantAttnProcessor (check_attention_processors)
    unet.save_pretrained = _save_pretrained_refused  # diffusers' would write a float UNet without the quantizers

    splits = concat_splits(unet) if spec.split_concat else {}  # traced on the float model, before the swap
    for name, m in modules:
        if not keep(m, name):
            continue
        if isinstance(m, nn.Conv2d):
            split = splits.get(name, 0)
            new = QuantConv2d.from_float(m, spec.weight_spec(name), spec.act_spec(name), ctx, init_weights, split)
            _set_submodule(unet, name, new)
        elif isinstance(m, nn.Linear):
            new = QuantLinear.from_float(m, spec.weight_spec(name), spec.act_spec(name), ctx, init_weights)
            _set_submodule(unet, name, new)
    if spec.quantize_attention:
        for name, m in modules:
            if not isinstance(m, Attention) or not keep(m, name):
                continue
            if getattr(m, "add_k_proj", None) is not None or getattr(m, "norm_added_q", None) is not None:
                raise NotImplementedError(f"attention {name!r} has added key/value projections: not supported")
            w = m.to_q.weight
            proc = QuantAttnProcessor(spec.act_spec(name), spec.prob_spec(name), ctx).to(device=w.device, dtype=w.dtype)
            m.set_processor(proc)
            unet._dq_quant_attention.append(name)

    for name in spec.fp_input_quantizers().values():  # checked above: the layer is quantized
        unet.get_submodule(name).enabled = False

    set_timesteps(unet, timesteps)
    unet.register_forward_pre_hook(_step_index_hook, with_kwargs=True)
    return quant_report(unet)
