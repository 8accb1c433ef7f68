"""A tiny example input for one forward pass of a diffusers UNet (to trace its structure, not to compute)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["example_inputs", "trace_forward"]


def example_inputs(unet: nn.Module, caller: str = "this function") -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Small zero `(args, kwargs)` for one forward pass of a plain DDPM or text-conditioned diffusers UNet.

    Args:
        unet: The UNet (its config gives channels, depth and conditioning).
        caller: Named in the error raised when the UNet needs inputs this cannot make up.
    """
    cfg = unet.config
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    size = 2 ** len(cfg.block_out_channels)  # survives every downsampler
    sample = torch.zeros(1, cfg.in_channels, size, size, device=device, dtype=dtype)
    kwargs: dict[str, Any] = {}
    hint = f"pass `example_inputs=(args, kwargs)` to {caller}"
    if cfg.get("addition_embed_type") is not None:
        raise ValueError(f"addition_embed_type={cfg.addition_embed_type!r} needs extra inputs: {hint}.")
    if "cross_attention_dim" in cfg:  # UNet2DConditionModel
        dim = cfg.get("encoder_hid_dim") or cfg.cross_attention_dim
        if isinstance(dim, (list, tuple)):
            if len(set(dim)) != 1:
                raise ValueError(f"per-block cross_attention_dim={dim}: {hint}.")
            dim = dim[0]
        kwargs["encoder_hidden_states"] = torch.zeros(1, 4, dim, device=device, dtype=dtype)
    if getattr(unet, "class_embedding", None) is not None:
        kind = cfg.get("class_embed_type")
        if kind is None:
            kwargs["class_labels"] = torch.zeros(1, dtype=torch.long, device=device)
        elif kind == "timestep":
            kwargs["class_labels"] = torch.full((1,), 5, dtype=torch.long, device=device)
        else:
            raise ValueError(f"class_embed_type={kind!r} needs specific class labels: {hint}.")
    # dq.quant.model.TIMESTEPS_BUFFER (not imported: models stay below quant); a quantized model refuses other steps
    table = getattr(unet, "dq_timesteps", None)
    t = table[:1].to(device) if table is not None else torch.tensor([10], device=device)
    return (sample, t), kwargs


@torch.no_grad()
def trace_forward(
    unet: nn.Module,
    hooks: Sequence[RemovableHandle],
    inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None,
    caller: str = "this function",
) -> None:
    """One eval-mode forward pass on `inputs` (default: `example_inputs`) for `hooks` to observe; then the hooks are
    removed and the module's training mode restored, also when the pass fails."""
    was_training = unet.training
    try:
        args, kwargs = inputs if inputs is not None else example_inputs(unet, caller)
        unet.eval()
        unet(*args, **kwargs)
    finally:
        unet.train(was_training)
        for h in hooks:
            h.remove()
