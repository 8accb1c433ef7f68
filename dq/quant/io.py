"""Save and load quantized diffusers models: `quant_spec.json` + `model-<save id>.safetensors` (+ `config.json`).

Nothing is pickled: the base model is rebuilt from its diffusers config, re-quantized with the saved spec, its
temporal quantizers expanded as saved, and the whole state dict loaded strictly. `quant_spec.json` is the save's
commit point: it names the weights file of its own save and holds the diffusers config, so a save killed at any point
leaves either the earlier save or the new one loadable, never a mix.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers.models.attention_processor import Attention
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from dq.errors import CheckpointError, MissingFileError
from dq.quant.attention import QuantAttnProcessor
from dq.quant.layers import QuantLayerMixin
from dq.quant.lora import adapter
from dq.quant.model import (
    TIMESTEPS_BUFFER,
    act_quantizers,
    check_attention_processors,
    quant_modules,
    quant_spec,
    quantizable_layers,
    quantize_model,
)
from dq.quant.spec import QuantSpec
from dq.utils.io import atomic_write, atomic_write_text

__all__ = ["save_quantized", "load_quantized", "saved_students", "weights_file", "CONFIG_NAME", "SPEC_NAME"]

CONFIG_NAME = "config.json"
SPEC_NAME = "quant_spec.json"
LEGACY_WEIGHTS_NAME = "model.safetensors"  # saves whose quant_spec.json names no weights file (before format 2)
WEIGHTS_PATTERN = re.compile(r"model(-[0-9a-f]{32})?\.safetensors")  # the weights files save_quantized writes
FORMAT_VERSION = 2


def saved_students(roots: Iterable[Path]) -> list[tuple[Path, Path]]:
    """`(root, student directory)` of every `student/` that dq-train saved below `roots`, each root's sorted."""
    return [(root, p.parent) for root in roots for p in sorted(root.rglob(SPEC_NAME)) if p.parent.name == "student"]


def save_quantized(model: nn.Module, directory: str | Path, teacher: str | None = None) -> Path:
    """Write a quantized diffusers model to `directory`.

    Files: `model-<save id>.safetensors` (the full state dict), then `quant_spec.json` (spec, timestep table,
    per-quantizer num_steps, which layers and attention modules are quantized, the diffusers config, the weights
    file's name, and `teacher`, the full-precision model's `teacher_fingerprint` where given, so that dq-eval compares
    the student with the model it came from), then `config.json` (the diffusers config, as diffusers writes it); the
    earlier save's weights file is removed last. Each file is written beside its place and renamed in, and
    `quant_spec.json` commits the save: killed before it, the directory still loads as the earlier save.

    Returns:
        The directory.
    """
    adapted = [n for n, m in model.named_modules() if adapter(m) is not None]
    if adapted:  # its state dict would hold parametrizations.* keys that load_quantized cannot read
        raise ValueError(
            f"{len(adapted)} layers (first: {adapted[0]}) still hold low-rank adapters: merge them into the weights "
            "first (dq.quant.merge_lora; the lora callback does so when training ends)"
        )
    spec = quant_spec(model)
    check_attention_processors(model)  # a float processor would save a model whose attention runs unquantized
    if not hasattr(model, "save_config"):
        raise TypeError(f"{type(model).__name__} is not a diffusers model (no save_config)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    table = getattr(model, TIMESTEPS_BUFFER, None)
    layers, attention = [], []
    for name, m in quant_modules(model):
        if isinstance(m, QuantAttnProcessor):
            attention.append(name.removesuffix(".processor"))
        elif isinstance(m, QuantLayerMixin):
            layers.append(name)
    meta = {
        "format_version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "spec": spec.to_dict(),
        "timesteps": None if table is None else table.tolist(),
        "timesteps_dtype": None if table is None else str(table.dtype).removeprefix("torch."),
        "num_steps": {name: q.num_steps for name, q in act_quantizers(model)},
        "quantized_layers": layers,
        "quantized_attention": attention,
        "teacher": teacher,
        "save_id": (save_id := uuid.uuid4().hex),  # also in the weights' metadata: the two files of one save
        "weights": (weights := f"model-{save_id}.safetensors"),
        "config": json.loads(model.to_json_string()),  # config.json's content, committed with the save
    }
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # each file whole or not at all (a save killed half-way leaves the earlier file, never a truncated one); the new
    # weights go to a file of their own, so the earlier save stays whole until quant_spec.json names the new one
    metadata = {"format": "pt", "dq_save_id": save_id}
    atomic_write(directory / weights, lambda tmp: save_file(state, tmp, metadata=metadata))
    atomic_write_text(directory / SPEC_NAME, json.dumps(meta, indent=2))  # the commit point
    atomic_write(directory / model.config_name, model.to_json_file)  # what diffusers' save_config writes
    for old in directory.iterdir():  # earlier saves' weights, no longer named by quant_spec.json
        if old.name != weights and WEIGHTS_PATTERN.fullmatch(old.name):
            old.unlink(missing_ok=True)
    return directory


def weights_file(directory: str | Path) -> Path:
    """The weights file of the save in `directory` (the one its `quant_spec.json` names)."""
    directory = Path(directory)
    return _weights_path(directory, _read_json(directory / SPEC_NAME))


def _weights_path(directory: Path, meta: dict[str, Any]) -> Path:
    name = meta.get("weights", LEGACY_WEIGHTS_NAME)
    if not (isinstance(name, str) and WEIGHTS_PATTERN.fullmatch(name)):
        raise CheckpointError(
            f"{directory / SPEC_NAME} is invalid: weights={name!r} is not a weights file save_quantized writes "
            "(model-<save id>.safetensors)"
        )
    return directory / name


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        if not path.parent.is_dir():
            raise MissingFileError(f"{path.parent} is not a directory: pass the folder save_quantized wrote")
        hint = " (a dq-train run keeps its student in <run>/student)"
        if (path.parent / "student" / path.name).is_file():
            hint = f": pass {path.parent / 'student'}, where this dq-train run keeps its student"
        raise MissingFileError(f"{path.name} not found in {path.parent}: not a saved quantized model{hint}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is corrupt: expected a JSON object")
    return data


def load_quantized(directory: str | Path, device: str | torch.device | None = None) -> nn.Module:
    """Rebuild a model written by `save_quantized`, in the dtype it was saved in; outputs are bit-identical to the
    saved model's.

    Args:
        directory: The directory `save_quantized` wrote.
        device: Where to put the model (default: CPU).

    Returns:
        The quantized diffusers model, in eval mode.
    """
    directory = Path(directory)
    meta = _read_json(directory / SPEC_NAME)
    config = meta.get("config")
    if not isinstance(config, dict):  # saves before format 2 keep the config in config.json only
        config = _read_json(directory / CONFIG_NAME)
    weights = _weights_path(directory, meta)
    if not weights.is_file():
        raise MissingFileError(
            f"{weights.name} not found in {directory}, though its {SPEC_NAME} names it: save the model again with "
            "dq.quant.save_quantized, or re-run the dq-train run that wrote it"
        )
    try:
        keys = ("spec", "quantized_layers", "quantized_attention", "num_steps", "timesteps")
        missing = [k for k in keys if k not in meta]
        if missing:
            raise KeyError(", ".join(missing))
        spec = QuantSpec.from_dict(meta["spec"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / SPEC_NAME} is invalid: {e}") from e

    try:
        model = _rebuild(directory, config, meta, spec, weights)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:  # files that do not fit together
        raise CheckpointError(
            f"{directory} does not hold a loadable student ({type(e).__name__}: {e}): save it again with "
            "dq.quant.save_quantized, or re-run the dq-train run that wrote it"
        ) from e
    if device is not None:
        model.to(device)
    return model.eval()


def _rebuild(
    directory: Path, config: dict[str, Any], meta: dict[str, Any], spec: QuantSpec, weights: Path
) -> nn.Module:
    """`load_quantized` once its files are read: the model, quantized as saved, with the saved state loaded."""
    class_name = config.get("_class_name")
    cls = getattr(diffusers, str(class_name), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise CheckpointError(f"{directory}: the config's _class_name={class_name!r} is not a diffusers model class")
    model = cls.from_config(config)
    spec.check_keep_8bit(quantizable_layers(model), f"{directory / SPEC_NAME}, spec.keep_8bit")

    layers, attention = set(meta["quantized_layers"]), set(meta["quantized_attention"])

    def saved(module: nn.Module, name: str) -> bool:
        return name in (attention if isinstance(module, Attention) else layers)

    timesteps = None
    if meta["timesteps"] is not None:
        timesteps = torch.tensor(meta["timesteps"], dtype=getattr(torch, meta.get("timesteps_dtype") or "float32"))
    quantize_model(model, spec, timesteps=timesteps, filter_fn=saved, init_weights=False)
    for name, q in act_quantizers(model):
        if name not in meta["num_steps"]:
            raise CheckpointError(f"{directory / SPEC_NAME} lists no num_steps for activation quantizer {name!r}")
        q.expand_steps(int(meta["num_steps"][name]))

    try:
        with safe_open(str(weights), "pt") as f:  # one read: the save's id and the tensors
            weights_id = (f.metadata() or {}).get("dq_save_id")
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights} is corrupt: {e}") from e
    if weights_id and meta.get("save_id") and weights_id != meta["save_id"]:  # both absent in saves before save_id
        raise CheckpointError(
            f"{weights} and {directory / SPEC_NAME} come from two different saves (one killed part-way?): save the "
            "model again with dq.quant.save_quantized, or re-run the dq-train run that wrote it"
        )
    saved_dtypes = {v.dtype for k, v in state.items() if v.is_floating_point() and not k.endswith(TIMESTEPS_BUFFER)}
    if len(saved_dtypes) == 1 and (dtype := saved_dtypes.pop()) != model.dtype:  # saved in float16 / float64 / ...
        model.to(dtype)
    model.load_state_dict(state, strict=True)
    return model
