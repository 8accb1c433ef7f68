"""Blocks of a diffusers UNet for block-wise distillation, and capturing / re-running one block's inputs.

A `Block` is a named group of submodules trained together (METHOD.md §3): the time-embedding MLP, `conv_in`, each
ResNet block, each attention / transformer block, each down/up-sampler, and `conv_norm_out + conv_act + conv_out`.
`capture_block_io` records what a block receives and returns during a forward pass (stopping the pass right after
the block), and `run_block` re-runs the block from such a capture, so a student block can be trained on inputs
produced by the student's earlier blocks against the teacher's outputs.

Exact reproduction (`run_block(model, block, capture_block_io(model, block, run)) == captured output`) holds
for a model in eval mode (dropout off) on deterministic kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dq.models.example import trace_forward

__all__ = ["Block", "BlockIO", "ModuleCall", "capture_block_io", "partition_blocks", "run_block"]

# Module containers inside a UNet stage (down_blocks.i / mid_block / up_blocks.i) and the block kind they give.
_STAGE_CHILDREN = {
    "resnets": "resnet",
    "attentions": "attention",
    "downsamplers": "downsampler",
    "upsamplers": "upsampler",
}
_TIME_MODULES = ("time_embedding", "class_embedding", "add_embedding", "time_embed_act")  # in forward order
_OUT_MODULES = ("conv_norm_out", "conv_act", "conv_out")


@dataclass
class Block:
    """A unit of block-wise distillation.

    Attributes:
        name: block name: the module's qualified name for single-module blocks, `time_embedding` for the
            time-embedding block and `conv_out` for the output block (`conv_norm_out + conv_act + conv_out`).
        modules: qualified submodule names, in execution order of the forward pass.
        kind: one of `time_embedding`, `conv_in`, `resnet`, `attention`, `downsampler`, `upsampler`, `conv_out`.
    """

    name: str
    modules: list[str]
    kind: str

    @property
    def entry_modules(self) -> list[str]:
        """Modules whose inputs come from outside the block (the ones `BlockIO.calls` holds)."""
        if self.kind == "time_embedding":  # the embeddings are parallel; time_embed_act consumes their sum
            return [m for m in self.modules if m != "time_embed_act"]
        return self.modules[:1]  # single module, or a chain (conv_out block) fed by its first module


@dataclass
class ModuleCall:
    """The positional and keyword arguments one module was called with (tensors detached and cloned)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class BlockIO:
    """A block's captured inputs and output for a batch of `B` samples.

    Tensors whose first dimension is `B` are batched (sliced and concatenated along dim 0); other values
    (None, floats, shared tensors) pass through unchanged and must agree between captures that are concatenated.

    Attributes:
        calls: entry module name -> its call arguments, e.g. `{"up_blocks.0.resnets.0": ModuleCall((x_cat, temb))}`
            where `x_cat` [B, C_in + C_skip, H, W] is the up-block's input concatenated with the skip tensor.
        output: [B, ...] the block's output (for the time block: the embedding the rest of the UNet receives).
    """

    calls: dict[str, ModuleCall]
    output: torch.Tensor  # [B, ...]

    @property
    def batch_size(self) -> int:
        return self.output.shape[0]

    @property
    def args(self) -> tuple[Any, ...]:
        """Positional arguments of the first entry module (the only one for single-module blocks)."""
        return next(iter(self.calls.values())).args

    @property
    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the first entry module."""
        return next(iter(self.calls.values())).kwargs

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> BlockIO:
        b = self.batch_size
        leaf = lambda t: fn(t) if _is_batched(t, b) else t
        calls = {k: ModuleCall(_tree_map(leaf, c.args), _tree_map(leaf, c.kwargs)) for k, c in self.calls.items()}
        return BlockIO(calls, fn(self.output))

    def slice(self, idx: torch.Tensor | Sequence[int] | slice) -> BlockIO:
        """The samples at `idx` (index tensor, list of ints or slice; the batch dimension is kept)."""
        if not isinstance(idx, (slice, torch.Tensor)):
            idx = torch.as_tensor(list(idx), dtype=torch.long)
        return self._map(lambda t: t[idx.to(t.device) if isinstance(idx, torch.Tensor) else idx])

    def to(self, device: torch.device | str) -> BlockIO:
        """A copy with every tensor (batched or not) on `device`."""
        calls = {
            k: ModuleCall(_tree_map(lambda t: t.to(device), c.args), _tree_map(lambda t: t.to(device), c.kwargs))
            for k, c in self.calls.items()
        }
        return BlockIO(calls, self.output.to(device))

    @staticmethod
    def cat(ios: Sequence[BlockIO]) -> BlockIO:
        """Concatenate captures of the same block along the batch dimension."""
        if not ios:
            raise ValueError("BlockIO.cat needs at least one capture.")
        if len({tuple(io.calls) for io in ios}) != 1:
            raise ValueError("BlockIO.cat: the captures come from different blocks.")
        sizes = [io.batch_size for io in ios]

        def merge(*leaves: Any) -> Any:
            if all(isinstance(v, torch.Tensor) for v in leaves):
                if all(_is_batched(v, b) for v, b in zip(leaves, sizes, strict=True)):
                    return torch.cat(leaves)
                if all(v.shape == leaves[0].shape and torch.equal(v, leaves[0]) for v in leaves):
                    return leaves[0]
            elif all(not isinstance(v, torch.Tensor) and v == leaves[0] for v in leaves):
                return leaves[0]
            raise ValueError("BlockIO.cat: a non-batched argument differs between captures.")

        calls = {}
        for name in ios[0].calls:
            parts = [io.calls[name] for io in ios]
            args = _tree_zip_map(merge, [p.args for p in parts])
            kwargs = _tree_zip_map(merge, [p.kwargs for p in parts])
            calls[name] = ModuleCall(args, kwargs)
        return BlockIO(calls, torch.cat([io.output for io in ios]))


def _is_batched(t: torch.Tensor, batch_size: int) -> bool:
    return t.dim() > 0 and t.shape[0] == batch_size


def _tree_map(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    """Apply `fn` to every tensor in nested tuples / lists / dicts; other leaves are returned as they are."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_tree_map(fn, v) for v in obj)
    if isinstance(obj, list):
        return [_tree_map(fn, v) for v in obj]
    if isinstance(obj, dict):
        return {k: _tree_map(fn, v) for k, v in obj.items()}
    return obj


def _tree_zip_map(fn: Callable[..., Any], objs: list[Any]) -> Any:
    """Apply `fn(*leaves)` across structurally identical nested tuples / lists / dicts."""
    first = objs[0]
    if isinstance(first, (tuple, list)):
        if any(type(o) is not type(first) or len(o) != len(first) for o in objs):
            raise ValueError("BlockIO.cat: captures differ in structure.")
        return type(first)(_tree_zip_map(fn, [o[i] for o in objs]) for i in range(len(first)))
    if isinstance(first, dict):
        if any(not isinstance(o, dict) or o.keys() != first.keys() for o in objs):
            raise ValueError("BlockIO.cat: captures differ in structure.")
        return {k: _tree_zip_map(fn, [o[k] for o in objs]) for k in first}
    return fn(*objs)


def _as_tensor(out: Any) -> torch.Tensor:
    """A module's main output: the tensor itself, `.sample` of a diffusers output, or element 0 of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"Cannot take a tensor from a block output of type {type(out).__name__}.")


# --------------------------------------------------------------------------------------------------- partition


def _candidate_blocks(unet: nn.Module) -> list[Block]:
    """All blocks of `unet` in an arbitrary order (execution order is found by `partition_blocks`)."""
    present = lambda name: getattr(unet, name, None) is not None
    if not present("time_embedding") or not present("conv_in") or not present("conv_out"):
        raise TypeError(
            f"partition_blocks expects a diffusers UNet2DModel / UNet2DConditionModel, got {type(unet).__name__}."
        )
    blocks = [
        Block("time_embedding", [m for m in _TIME_MODULES if present(m)], "time_embedding"),
        Block("conv_in", ["conv_in"], "conv_in"),
    ]
    stages = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
    stages += ["mid_block"] if present("mid_block") else []
    stages += [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
    for stage in stages:
        stage_mod = unet.get_submodule(stage)
        for child, kind in _STAGE_CHILDREN.items():
            for j, m in enumerate(getattr(stage_mod, child, None) or []):
                if m is not None:
                    name = f"{stage}.{child}.{j}"
                    blocks.append(Block(name, [name], kind))
    blocks.append(Block("conv_out", [m for m in _OUT_MODULES if present(m)], "conv_out"))
    return blocks


@torch.no_grad()
def partition_blocks(
    unet: nn.Module, example_inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None
) -> list[Block]:
    """Split a diffusers `UNet2DModel` / `UNet2DConditionModel` into distillation blocks, in execution order.

    The order (of the blocks, and of the modules inside a block) is measured with forward pre-hooks during one
    forward pass on `example_inputs = (args, kwargs)` (default: a tiny zero input built from the config), so
    `mid_block` comes between the down and up blocks and a mid attention between its two resnets.

    Raises:
        ValueError: a parameter belongs to no block (an unsupported architecture, e.g. skip / Fourier UNets),
            or a block was not executed by the example forward.
    """
    candidates = _candidate_blocks(unet)
    covered = {f"{m}.{p}" for b in candidates for m in b.modules for p, _ in unet.get_submodule(m).named_parameters()}
    orphans = [n for n, _ in unet.named_parameters() if n not in covered]
    if orphans:
        raise ValueError(f"partition_blocks: parameters outside every supported block: {orphans[:8]}.")

    first_call: dict[str, int] = {}
    hooks = []

    def record(name: str) -> Callable[..., None]:
        def hook(_mod: nn.Module, _args: tuple[Any, ...]) -> None:  # must return None (else it replaces args)
            first_call.setdefault(name, len(first_call))

        return hook

    for name in sorted({m for b in candidates for m in b.modules}):
        hooks.append(unet.get_submodule(name).register_forward_pre_hook(record(name)))
    trace_forward(unet, hooks, example_inputs, "partition_blocks")
    missing = sorted({m for b in candidates for m in b.modules} - set(first_call))
    if missing:
        raise ValueError(
            f"partition_blocks: modules {missing} did not run in the example forward; pass example_inputs."
        )
    ordered = [Block(b.name, sorted(b.modules, key=first_call.__getitem__), b.kind) for b in candidates]
    return sorted(ordered, key=lambda b: first_call[b.modules[0]])


# ---------------------------------------------------------------------------------------------- capture / run


class _StopForward(Exception):
    """Raised from a forward hook to end a forward pass once the captured block has run."""


def _detach_clone(obj: Any) -> Any:
    return _tree_map(lambda t: t.detach().clone(), obj)


def _combine_time(model: nn.Module, block: Block, outs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The UNet's `emb` from its embedding modules' outputs, mirroring UNet2D(Condition)Model.forward."""
    emb = outs["time_embedding"]
    if "class_embedding" in outs:
        class_emb = outs["class_embedding"].to(dtype=emb.dtype)
        concat = model.config.get("class_embeddings_concat", False)
        emb = torch.cat([emb, class_emb], dim=-1) if concat else emb + class_emb
    if "add_embedding" in outs:
        emb = emb + outs["add_embedding"]
    if "time_embed_act" in block.modules:
        emb = model.get_submodule("time_embed_act")(emb)
    return emb


@torch.no_grad()
def capture_block_io(model: nn.Module, block: Block, run: Callable[[], Any]) -> BlockIO:
    """Record `block`'s inputs and output while `run()` does a forward pass of `model`, then stop the pass.

    Forward pre-hooks copy the entry modules' positional and keyword arguments (up-block resnets receive the
    skip-concatenated input, resnets the time embedding `temb`, transformer blocks `encoder_hidden_states`…);
    a forward hook on the block's last module records the output and raises a private exception that ends the
    forward pass early (later modules never run). Runs under `torch.no_grad()`; tensors are detached copies.

    Args:
        model: the UNet that `run` calls (teacher or student; module names as in `block.modules`).
        block: a block from `partition_blocks(model)`.
        run: runs one forward pass, e.g. `lambda: model(x_t, t, encoder_hidden_states=c)`.
    """
    calls: dict[str, ModuleCall] = {}
    outs: dict[str, torch.Tensor] = {}
    last = block.modules[-1]
    entries = set(block.entry_modules)

    def pre_hook(name: str) -> Callable[..., None]:
        def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if name in entries and name not in calls:
                calls[name] = ModuleCall(_detach_clone(args), _detach_clone(kwargs))

        return hook

    def post_hook(name: str) -> Callable[..., None]:
        def hook(_mod: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
            outs.setdefault(name, _as_tensor(output).detach().clone())
            if name == last:
                raise _StopForward

        return hook

    handles = []
    for name in block.modules:
        mod = model.get_submodule(name)
        handles.append(mod.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
        handles.append(mod.register_forward_hook(post_hook(name)))
    try:
        run()
    except _StopForward:
        pass
    else:
        raise RuntimeError(f"capture_block_io: block '{block.name}' did not run during the forward pass.")
    finally:
        for h in handles:
            h.remove()
    if block.kind == "time_embedding" and "time_embed_act" not in block.modules:
        output = _combine_time(model, block, outs)  # the sum is not a module output; same ops as the forward
    else:
        output = outs[last]
    return BlockIO(calls={m: calls[m] for m in block.entry_modules}, output=output)


def run_block(model: nn.Module, block: Block, io: BlockIO) -> torch.Tensor:
    """Re-run `block` of `model` on captured inputs; returns the block output [B, ...].

    Single-module blocks call the module with the captured args and kwargs; the output block applies
    `conv_norm_out -> conv_act -> conv_out` in sequence; the time block applies each embedding module to its
    captured input and combines them as the UNet does (sum or concat with the class embedding, plus the
    addition embedding, then `time_embed_act` when the model has one). Gradients flow (no `no_grad` here).
    A quantized model's per-step quantizers read the step index of `step_context(model).index`, which a forward
    pass of the whole model sets: set it to the captured samples' step indices first (BKD does).
    """
    call = lambda name: model.get_submodule(name)(*io.calls[name].args, **io.calls[name].kwargs)
    if block.kind == "time_embedding":
        outs = {name: _as_tensor(call(name)) for name in block.entry_modules}
        return _combine_time(model, block, outs)
    x = _as_tensor(call(block.modules[0]))
    for name in block.modules[1:]:
        x = _as_tensor(model.get_submodule(name)(x))
    return x
