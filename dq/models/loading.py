"""Load a teacher UNet and its scheduler from a local diffusers directory (never from a hub)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

from diffusers import DDIMScheduler, UNet2DConditionModel, UNet2DModel
from diffusers.models.modeling_utils import ModelMixin

from dq.errors import CheckpointError, ConfigError, MissingFileError


def _unet_class(unet_dir: Path) -> type[ModelMixin]:
    import json

    try:
        config = json.loads((unet_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"Cannot read '{unet_dir / 'config.json'}': {e}. Re-create or re-download it.") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"'{unet_dir / 'config.json'}' is not a JSON object: re-create or re-download it.")
    cls_name = config.get("_class_name", "UNet2DModel")
    classes = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}
    if not isinstance(cls_name, str) or cls_name not in classes:
        raise CheckpointError(f"'{unet_dir}' holds a {cls_name!r}; dq loads {sorted(classes)}.")
    return classes[cls_name]


def _require_safetensors(unet_dir: Path, cls: type[ModelMixin]) -> None:
    """Refuse a UNet saved only as a pickle (`*.bin`), with the command that converts it (a pickle can run code)."""
    if any(unet_dir.glob("*.safetensors")) or not any(unet_dir.glob("*.bin")):
        return  # safetensors present, or no weights at all (diffusers names the missing file)
    convert = (
        f'python -c "from diffusers import {cls.__name__} as M; '
        f"M.from_pretrained('{unet_dir}', use_safetensors=False).save_pretrained('{unet_dir}')\""
    )
    raise CheckpointError(
        f"'{unet_dir}' holds its weights only as a PyTorch pickle (*.bin). dq loads safetensors only, since loading a "
        f"pickle can run code: if you trust the file, convert it once with\n    {convert}"
    )


def load_teacher(path: str | Path, field: str = "model.path") -> tuple[ModelMixin, DDIMScheduler]:
    """Load `(unet, ddim_scheduler)` from a diffusers pipeline directory with `unet/` and `scheduler/`.

    The directory may also be a bare UNet directory (config.json + weights) with a `scheduler/` beside it.
    Nothing is downloaded: `path` must exist locally.

    Raises:
        MissingFileError: `path` or a file in it does not exist (the message names the config field to fix).
        ConfigError: `path` is a student saved by dq, not a teacher.
        CheckpointError: the files are there but corrupt or incomplete.
    """
    if not isinstance(path, str | Path) or not str(path):
        raise ConfigError(f"`{field}`={path!r}: set it to a local diffusers directory (with unet/ and scheduler/).")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise MissingFileError(
            f"Model directory '{root}' {'is a file, not a directory' if root.exists() else 'does not exist'}. Set "
            f"`{field}` to a local diffusers directory "
            "(with unet/ and scheduler/); dq never downloads models."
        )
    unet_dir = root / "unet" if (root / "unet").is_dir() else root
    sched_dir = root / "scheduler"
    if (unet_dir / "quant_spec.json").is_file():  # dq.quant.io.SPEC_NAME (not imported: models stay below quant)
        raise ConfigError(
            f"`{field}`={root} is a quantized student saved by dq (quant_spec.json), not a teacher: keep `{field}` at "
            f"the full-precision model and pass the student as `student_dir={root}` to dq-eval."
        )
    if not (unet_dir / "config.json").is_file():
        raise MissingFileError(f"'{unet_dir}' has no config.json: `{field}` must name a diffusers model directory.")
    if not (sched_dir / "scheduler_config.json").is_file():
        raise MissingFileError(f"'{sched_dir}/scheduler_config.json' is missing: the teacher needs its schedule.")
    cls = _unet_class(unet_dir)
    _require_safetensors(unet_dir, cls)
    try:
        # low_cpu_mem_usage=False: what diffusers falls back to without `accelerate`, said here so it stops
        # printing a notice about it on every load
        unet = cls.from_pretrained(unet_dir, local_files_only=True, use_safetensors=True, low_cpu_mem_usage=False)
        scheduler = DDIMScheduler.from_pretrained(sched_dir, local_files_only=True)
    except Exception as e:  # diffusers raises many types for bad files; name the directory instead
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        detail = " ".join(lines[:2]) + (f" (and {len(lines) - 2} more lines)" if len(lines) > 2 else "")
        raise CheckpointError(
            f"Could not load the model in '{root}' ({type(e).__name__}: {detail}). The checkpoint is corrupt or "
            "incomplete, or its config.json does not describe its weights: re-create it (dq-pretrain) or copy it again."
        ) from e
    return unet.eval().requires_grad_(False), scheduler


def check_inference_steps(scheduler: DDIMScheduler, steps: int, field: str = "model.num_inference_steps") -> None:
    """Refuse more sampling steps than the teacher's schedule has timesteps (diffusers would fail later)."""
    train_steps = scheduler.config.get("num_train_timesteps")
    if not isinstance(train_steps, int) or steps > train_steps:
        raise ConfigError(
            f"{field}={steps}: the teacher's schedule (scheduler_config.json) has num_train_timesteps={train_steps!r}, "
            f"so at most that many sampling steps."
        )


def check_unconditional(unet: ModelMixin, field: str = "model.path") -> None:
    """Refuse a conditional UNet where dq samples without conditioning (dq-train, dq-eval): its forward needs
    `encoder_hidden_states`, and the command line has no setting that gives them."""
    if isinstance(unet, UNet2DConditionModel):
        raise ConfigError(
            f"{field} holds a UNet2DConditionModel: dq-train and dq-eval sample unconditional UNets only. Quantize it "
            "from Python, passing the conditioning to `dq.distill.get_calibration_set(..., encoder_hidden_states=...)`."
        )


def check_sample_shape(unet: ModelMixin, shape: Sequence[int], field: str = "model.sample_shape") -> None:
    """Refuse a sample shape the UNet cannot denoise (channels, rank, sides its down-sampling cannot halve) before
    anything is computed; warn where it differs from the size the UNet was trained at (convolutions accept it)."""
    shape = list(shape)
    channels = unet.config.get("in_channels")
    levels = len(unet.config.get("down_block_types", ())) - 1  # each down block but the last halves the sides
    if len(shape) != 3 or any(not isinstance(n, int) or n < 1 for n in shape):
        raise ConfigError(f"{field}={shape} is invalid: give [channels, height, width], e.g. [{channels}, 32, 32].")
    if shape[0] != channels:
        raise ConfigError(f"{field}={shape} has {shape[0]} channels and the UNet takes {channels}: set {field}.")
    if any(n % 2**levels for n in shape[1:]):
        raise ConfigError(
            f"{field}={shape}: the UNet halves height and width {levels} times, so both must be multiples of "
            f"{2**levels}."
        )
    size = unet.config.get("sample_size")
    size = list(size) if isinstance(size, list | tuple) else [size, size]
    if size[0] is not None and shape[1:] != size:
        warnings.warn(
            f"{field}={shape} samples at {shape[1]}x{shape[2]}, and the UNet was built for {size[0]}x{size[1]} "
            f"(its config's sample_size): make sure this is the resolution you mean.",
            stacklevel=2,
        )
