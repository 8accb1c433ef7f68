"""Start-up validation of a composed dq config: every refusal names the field and what to do, before any work."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import inspect
import logging
import math
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf

from dq.data.folder import IMAGE_SUFFIXES, image_files
from dq.data.reference import DATASETS
from dq.distill.base import check_lr_bits
from dq.distill.bkd import ROUNDING_FIXES_WEIGHTS
from dq.distill.calibration import resolve_n_traj
from dq.distill.parallel import STRATEGY, BlockParallelStrategy, ddp_child, external_launcher
from dq.errors import CheckpointError, ConfigError, MissingFileError
from dq.metrics.classifier import INPUT_SHAPE as CLASSIFIER_SHAPE
from dq.metrics.classifier import MNISTClassifier
from dq.metrics.fid_is import CLASSIFIER_PATH_UNSET, inception_net
from dq.paths import conf_dir
from dq.quant import QuantSpec
from dq.student import SET_BY_BITS

CHOICES = {
    "eval.features": ("classifier", "inception", "none"),
    "eval.dtype": ("float32", "float16", "bfloat16"),
    "device": ("cpu", "cuda"),
    "callbacks.tpq.init": ("per_step", "shared"),
    "distill.lr_schedule": ("cosine", "constant"),
    "model.data.name": DATASETS,
}
# learning rates that must be numbers >= 0 (0 freezes a group)
RATES = (
    "distill.lr_weight",
    "distill.lr_weight_qparams",
    "distill.lr_act_qparams",
    "distill.lr_lora",
    "distill.lr_zero_point",
    "distill.lr_rounding",
)
# counts that must be whole numbers >= 1 (where the config has them); seeds must be whole numbers
COUNTS = (
    "eval.n_samples", "eval.batch_size", "eval.is_splits", "model.num_inference_steps",
    "calib.n_calib", "calib.n_traj", "calib.batch_size", "distill.iters_per_block", "distill.iters",
    "distill.batch_size", "distill.calib_batch_size", "eval.grid_n", "callbacks.tpq.batch_size",
    "callbacks.lora.rank", "model.data.size", "model.data.limit",
)  # fmt: skip
# whole numbers in [0, 2^32): Lightning's seed_everything takes no others, numpy's default_rng (model.data) no negative
SEEDS = ("seed", "calib.seed", "eval.seed", "model.data.seed")
SWITCHES = (
    "eval.progress", "eval.cache_teacher_samples", "eval.print_report", "distill.revert_worse", "distill.progress",
    "quantizer.temporal",
)  # fmt: skip
# names that become parts of paths (conf/train.yaml, eval.yaml, pretrain.yaml: hydra.run.dir), and what they name
RUN_PATH, RUN_FILE = "part of the run directory's path", "a file in the run directory"
PATH_NAMES = {
    "model.name": RUN_PATH, "quantizer.name": RUN_PATH, "bits.name": RUN_PATH, "distill.name": RUN_PATH,
    "pretrain.name": RUN_PATH, "callbacks.weight_dilation.filename": RUN_FILE,
}  # fmt: skip
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")  # one path component: no separator, no leading dot
# numbers in [lo, hi) (hi None: no upper bound), and what they are; null passes (lr_act_step_rel's default)
RANGES = {
    "distill.act_drop_prob": (0, 1, "the probability that an activation element skips quantization (QDrop), 0 for off"),
    "distill.lr_act_step_rel": (0, 1, "the fraction of itself an activation step size moves per step, or null"),
    "callbacks.weight_dilation.s_max": (1, None, "the largest dilation factor, >= 1"),
    "distill.dampen": (0, math.inf, "the weight of oscillation dampening relative to each block's MSE, 0 for off"),
    "distill.freeze": (0, 1, "the oscillation frequency above which a latent weight is frozen, 0 for off"),
    "distill.adam_eps": (1e-30, 1, "Adam's epsilon (1e-8 by default)"),
    "distill.rounding_reg": (0, math.inf, "AdaRound's regulariser weight (BRECQ's 0.01)"),
}


def validate(cfg: DictConfig) -> None:
    """Reject bad values at start-up, naming the field and what to do."""
    if HydraConfig.initialized() and cfg.get("run_dir") is not None:
        hydra_dir = HydraConfig.get().runtime.output_dir
        if Path(str(cfg.run_dir)).resolve() != Path(hydra_dir).resolve():
            raise ConfigError(
                f"run_dir={cfg.run_dir} would split the run: Hydra writes the composed config and the log to "
                f"{hydra_dir}. Pass hydra.run.dir={cfg.run_dir} instead (hydra.sweep.dir with -m; run_dir follows)."
            )
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        # only a device takes an index after its type (cuda:1)
        indexed = key == "device" and any(str(value).startswith(f"{a}:") for a in allowed)
        if value is not None and str(value) not in allowed and not indexed:
            raise ConfigError(f"{key}='{value}' is not one of {list(allowed)}.")
        if indexed:
            try:
                torch.device(str(value))
            except RuntimeError as e:
                raise ConfigError(f"device='{value}' is invalid: a device type and index, e.g. cuda:1 ({e}).") from e
    check_tags(OmegaConf.select(cfg, "tags"))
    check_path_names(cfg)
    check_quantizer_name(cfg)
    project, offline = (OmegaConf.select(cfg, f"logger.wandb.{k}") for k in ("project", "offline"))
    if OmegaConf.select(cfg, "logger.wandb") is not None and not (isinstance(project, str) and project.strip()):
        raise ConfigError(f"logger.wandb.project={project!r} is invalid: name the W&B project (dq's default: dq).")
    if offline is not None and not isinstance(offline, bool):
        raise ConfigError(
            f"logger.wandb.offline={offline!r} is invalid: true or false (by default offline unless WANDB_API_KEY is "
            "set)."
        )
    shape = OmegaConf.select(cfg, "model.sample_shape")
    if shape is not None and not (
        isinstance(shape, ListConfig) and len(shape) == 3 and all(_whole(n) and n >= 1 for n in shape)
    ):
        raise ConfigError(
            f"model.sample_shape={shape!r} is invalid: give [channels, height, width], whole numbers >= 1, e.g. "
            "[1, 28, 28]."
        )
    model = OmegaConf.select(cfg, "model")
    if isinstance(model, DictConfig) and OmegaConf.is_missing(model, "path"):
        raise ConfigError(
            f"model.path is not set: model={model.get('name', '?')} loads from a local diffusers directory (unet/ and "
            "scheduler/); pass model.path=<that directory>. dq never downloads models."
        )
    if OmegaConf.select(cfg, "eval.features") == "none" and OmegaConf.select(cfg, "eval.name") != "none":
        raise ConfigError("eval.features=none skips the evaluation: pass eval=none (the config group) instead.")
    _check_whole_numbers(cfg, COUNTS, SEEDS)
    for key in SWITCHES:
        _check_switch(key, OmegaConf.select(cfg, key))  # None: the config has no such key
    _check_ranges(cfg, RANGES)
    try:
        check_lr_bits(OmegaConf.select(cfg, "distill.lr_bits"))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    for key in RATES:
        value = OmegaConf.select(cfg, key)
        number = not isinstance(value, bool) and isinstance(value, int | float)
        if value is not None and (not number or not math.isfinite(value) or value < 0):  # nan, inf: no rate
            raise ConfigError(
                f"{key}={value!r} is invalid: a learning rate must be a finite number >= 0 (0 freezes it)."
            )
    # lr_act_step_rel, when set, trains the activation step sizes on its own (as set_optimization counts it)
    rates = {k: v for k in (*RATES, "distill.lr_act_step_rel") if (v := OmegaConf.select(cfg, k)) is not None}
    if rates and not any(rates.values()):  # the distillation classes refuse it too, but only after calibration
        raise ConfigError(
            f"{', '.join(f'{k}=0' for k in rates)}: nothing would train. For post-training quantization without "
            "training use distill=none."
        )
    keys = ("lr_rounding", "lr_weight", "lr_weight_qparams")
    lr_rounding, lr_weight, lr_weight_qparams = (OmegaConf.select(cfg, f"distill.{k}") for k in keys)
    if lr_rounding and (lr_weight or lr_weight_qparams):  # AdaRound's forward holds the weights and their Δ fixed
        raise ConfigError(ROUNDING_FIXES_WEIGHTS.format(lr_weight=lr_weight, lr_weight_qparams=lr_weight_qparams))
    batch, n_calib = OmegaConf.select(cfg, "distill.batch_size"), OmegaConf.select(cfg, "calib.n_calib")
    if isinstance(batch, int) and isinstance(n_calib, int) and batch > n_calib:
        raise ConfigError(
            f"distill.batch_size={batch} is larger than the calibration set (calib.n_calib={n_calib}): every batch "
            f"would repeat pairs. Lower distill.batch_size or raise calib.n_calib."
        )
    n_calib, steps, n_traj = (OmegaConf.select(cfg, k) for k in ("calib.n_calib", "model.num_inference_steps",
                                                                  "calib.n_traj"))  # fmt: skip
    if isinstance(n_calib, int) and isinstance(steps, int) and n_traj is not None:
        try:
            resolve_n_traj(n_calib, steps, n_traj)
        except ValueError as e:
            raise ConfigError(str(e)) from e
    check_eval(cfg)
    n, splits = OmegaConf.select(cfg, "eval.n_samples"), OmegaConf.select(cfg, "eval.is_splits")
    scored = OmegaConf.select(cfg, "eval.features") not in (None, "none") and n is not None and splits is not None
    if scored and (n < 2 or splits > n):
        raise ConfigError(
            f"eval.n_samples={n} with eval.is_splits={splits}: FID needs at least 2 samples and IS at least one "
            "sample per split. Use 1,000 samples for numbers comparable with dq's tables."
        )
    if n is not None and splits is not None and n < max(2 * splits, 100):  # tests run on purpose with fewer
        warnings.warn(
            f"eval.n_samples={n} is too few for meaningful scores: IS splits the samples into eval.is_splits={splits}"
            " groups and FID's covariances need more samples than feature dimensions. Use 1,000 for numbers"
            " comparable with dq's tables.",
            stacklevel=2,
        )
    check_adapters(cfg)
    check_settings(cfg)
    check_callbacks(cfg)
    if "student_dir" in cfg and HydraConfig.initialized():  # dq-eval: before the checks that speak of training
        check_eval_trainer(HydraConfig.get().overrides.task)
        check_eval_bits(cfg, HydraConfig.get().overrides.task, HydraConfig.get().mode == RunMode.MULTIRUN)
    check_trainer(cfg)
    if HydraConfig.initialized():
        check_appended(cfg, HydraConfig.get().overrides.task)
    if str(cfg.get("device", "cpu")).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device='{cfg.device}' but PyTorch sees no CUDA GPU here: use device=cpu (trainer=cpu).")
    accelerator = OmegaConf.select(cfg, "trainer.accelerator")
    if accelerator is not None and str(accelerator) in ("gpu", "cuda") and cfg.get("device") == "cpu":
        raise ConfigError(
            f"trainer.accelerator='{accelerator}' runs on the GPU but device='cpu' keeps calibration and evaluation"
            " on the CPU: use trainer=gpu (it sets device=cuda) or pass device=cuda."
        )
    check_trainer_values(cfg)


def _check_whole_numbers(cfg: DictConfig, counts: Sequence[str], seeds: Sequence[str]) -> None:
    """Counts must be whole numbers >= 1, seeds whole numbers in [0, 2^32) (where the config has them)."""
    for key in (*counts, *seeds):
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        count = key in counts
        if not _whole(value) or (value < 1 if count else not 0 <= value < 2**32):
            what = "a whole number >= 1" if count else "a whole number in [0, 2^32)"
            # 1e3 reaches here as the float 1000.0
            spell = f" (written as {int(value)}: Hydra reads {value!r} as a float)" if _whole_float(value) else ""
            raise ConfigError(f"{key}={value!r} is invalid: must be {what}{spell}.")


def _check_ranges(cfg: DictConfig, ranges: dict[str, tuple[float, float | None, str]]) -> None:
    """Each key (where the config has it) a number in [lo, hi) (hi None: no upper bound); null passes."""
    for key, (lo, hi, what) in ranges.items():
        value = OmegaConf.select(cfg, key)
        number = not isinstance(value, bool) and isinstance(value, int | float)
        if value is not None and (not number or not lo <= value or (hi is not None and not value < hi)):
            span = f"[{lo}, {hi})" if hi is not None else f">= {lo}"
            raise ConfigError(f"{key}={value!r} is invalid: a number {span}, {what}.")


def _check_switch(key: str, value: object, nullable: bool = True) -> None:
    """A setting that must be true or false (or null, where `nullable`)."""
    if not isinstance(value, bool) and not (value is None and nullable):
        raise ConfigError(f"{key}={value!r} is invalid: must be true or false.")


def _whole(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int)


def check_tags(tags: object) -> None:
    """`tags`: a list of labels, which W&B takes as the run's tags (each 1-64 characters)."""
    if tags is None:
        return
    if not isinstance(tags, ListConfig | list) or any(not isinstance(s, str) or not 1 <= len(s) <= 64 for s in tags):
        raise ConfigError(
            f"tags={tags!r} is invalid: a list of labels of 1-64 characters each (W&B's run tags), e.g. "
            "tags=[baseline,w4a8]."
        )


def check_path_names(cfg: DictConfig) -> None:
    """Names that become parts of paths must be plain: `model.name=../x` put the run outside outputs/ (or anywhere
    on the disk), a dilation file name with a directory wrote outside the run."""
    for key, what in PATH_NAMES.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and not (isinstance(value, str) and PLAIN_NAME.fullmatch(value)):
            raise ConfigError(
                f"{key}={value!r} is invalid: the name becomes {what}, so it must be a plain name of letters, digits "
                "and _ . + - not starting with a dot (e.g. my_unet, dilation.json)."
            )


def check_quantizer_name(cfg: DictConfig) -> None:
    """`quantizer.name=fp` means the full-precision teacher alone; every other quantizer needs a `spec`."""
    quantizer = OmegaConf.select(cfg, "quantizer")
    if not isinstance(quantizer, DictConfig):
        return
    name, spec = quantizer.get("name"), quantizer.get("spec")
    if name == "fp" and spec is not None:
        raise ConfigError(
            "quantizer.name=fp marks the full-precision teacher alone, but this quantizer has a quantizer.spec that "
            "would be ignored (only the teacher scored): keep the quantizer's own name, or pass quantizer=fp."
        )
    if name != "fp" and spec is None:
        raise ConfigError(
            f"quantizer.name={name!r} has no quantizer.spec, so there is nothing to quantize with: pick a quantizer "
            "group (conf/quantizer/), or quantizer=fp for the teacher alone."
        )


def _whole_float(value: object) -> bool:
    return isinstance(value, float) and value.is_integer() and value >= 0


def check_eval(cfg: DictConfig) -> None:
    """Refuse at start-up an evaluation that could only fail after training: FID reference images not named, the
    shipped MNIST classifier asked to score images of another shape, Inception without its packages or weights."""
    features = OmegaConf.select(cfg, "eval.features")
    if features in (None, "none") or OmegaConf.select(cfg, "model") is None:
        return
    score_later = (  # dq-eval (its config has student_dir) only scores, so eval=none is no way out there
        "or score another model" if "student_dir" in cfg
        else "or pass eval=none to train without scoring (dq-eval student_dir=<run>/student scores it later)"
    )  # fmt: skip
    if features == "classifier" and not OmegaConf.select(cfg, "eval.classifier_path"):
        raise ConfigError(CLASSIFIER_PATH_UNSET)
    data = cfg.model.get("data")
    folder = data is not None and data.get("name") == "image_folder"
    if folder and ("path" not in data or OmegaConf.is_missing(data, "path") or not data.path):
        raise ConfigError(
            f"model.data.path is not set: eval={cfg.eval.get('name', features)} computes FID against real images. "
            f"Set model.data.path to a local folder of the model's training images, {score_later}."
        )
    shape = OmegaConf.select(cfg, "model.sample_shape")
    if features == "classifier" and shape is not None and list(shape) != list(CLASSIFIER_SHAPE):
        raise ConfigError(
            f"eval.features=classifier scores with the shipped MNIST classifier, which takes {list(CLASSIFIER_SHAPE)} "
            f"images, and model.sample_shape is {list(shape)}: pass eval=inception with "
            f"eval.inception_weights_path=<local weights file> (pip install 'dq[inception]'), {score_later}."
        )
    if features == "inception":
        if OmegaConf.is_missing(cfg.eval, "inception_weights_path") or not cfg.eval.inception_weights_path:
            raise ConfigError(
                "eval.inception_weights_path is not set: eval=inception needs a local Inception weights file "
                f"(dq never downloads; torch-fidelity's pt_inception-2015-12-05 weights), {score_later}."
            )
        missing = [m for m in ("torch_fidelity", "torchvision") if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(
                f"eval=inception needs {' and '.join(missing)}, not installed here: pip install 'dq[inception]' "
                f"(torch-fidelity and a torchvision that matches your torch), {score_later}."
            )
    check_eval_files(cfg, features, score_later)


def check_eval_files(cfg: DictConfig, features: str, score_later: str) -> None:
    """The files a configured evaluation reads must exist now: the classifier, the Inception weights, the FID
    reference folder (each was a traceback once training had finished)."""
    if features == "classifier":
        clf = Path(str(cfg.eval.classifier_path)).expanduser()
        if not (clf / "model.safetensors").is_file():
            raise ConfigError(
                f"eval.classifier_path='{clf}' holds no classifier (model.safetensors): point it at a directory "
                f"`dq-pretrain pretrain=classifier` wrote, or leave it out for the shipped one, {score_later}."
            )
        try:  # load it now: a damaged file was found only once training had finished
            MNISTClassifier.load(clf)
        except CheckpointError as e:
            raise ConfigError(
                f"eval.classifier_path: {e} Re-make it with `dq-pretrain pretrain=classifier`, or leave "
                f"eval.classifier_path out for the shipped one, {score_later}."
            ) from e
    if features == "inception" and not Path(str(cfg.eval.inception_weights_path)).expanduser().is_file():
        raise ConfigError(
            f"eval.inception_weights_path='{cfg.eval.inception_weights_path}' is not a file: point it at a local "
            f"copy of torch-fidelity's pt_inception-2015-12-05 weights, {score_later}."
        )
    if features == "inception":  # load them now: a file of other weights was a traceback once training had finished
        inception_net(str(Path(str(cfg.eval.inception_weights_path)).expanduser()))
    data = cfg.model.get("data")
    if data is not None and data.get("name") == "image_folder":
        if not Path(str(data.path)).expanduser().is_dir():
            raise ConfigError(
                f"model.data.path='{data.path}' is not a directory: set it to a local folder of the model's "
                f"training images (FID's reference), {score_later}."
            )
        if (channels := data.get("channels")) not in (1, 3):
            raise ConfigError(f"model.data.channels={channels!r} is invalid: 1 (grey) or 3 (RGB).")
        if features == "classifier" and [channels, data.get("size")] != [CLASSIFIER_SHAPE[0], CLASSIFIER_SHAPE[1]]:
            raise ConfigError(
                f"model.data.channels={channels!r}, model.data.size={data.get('size')!r}: eval.features=classifier "
                f"compares with the shipped MNIST classifier, which takes {list(CLASSIFIER_SHAPE)} images; read the "
                f"folder as {CLASSIFIER_SHAPE[0]} channel(s) at {CLASSIFIER_SHAPE[1]} pixels, {score_later}."
            )
        try:
            image_files(Path(str(data.path)).expanduser(), data.get("limit"))
        except MissingFileError as e:
            raise ConfigError(
                f"model.data.path='{data.path}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}) for FID's "
                f"reference: point it at a folder of the model's training images, {score_later}."
            ) from e


def accepted_settings(target: type) -> set[str] | None:
    """The keyword arguments a dq class takes, following `**kwargs` up to the dq base classes it is passed to; where
    `**kwargs` leaves dq, on to the function the class names as `kwargs_target()` (the W&B logger's `wandb.init`), or
    None without one (then any name may be valid)."""
    names: set[str] = set()
    for cls in target.__mro__:
        if "__init__" not in vars(cls):
            continue
        params = inspect.signature(cls.__init__).parameters.values()
        names |= _named(params)
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names - {"self"}
        if not cls.__module__.startswith("dq."):
            if (forward := getattr(target, "kwargs_target", None)) is None:
                return None
            return (names | _named(inspect.signature(forward()).parameters.values())) - {"self"}
    return None


def _named(params: Iterable[inspect.Parameter]) -> set[str]:
    """The names of the parameters that can be passed by keyword."""
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_settings(cfg: DictConfig) -> None:
    """Refuse at start-up a setting that dq's class for `distill`, a callback or a logger does not take (a typo, or
    `+distill.foo=...`), instead of failing after the student was built."""
    nodes = {"distill": OmegaConf.select(cfg, "distill")}
    for group in ("callbacks", "logger"):
        for name, node in (OmegaConf.select(cfg, group) or {}).items():
            nodes[f"{group}.{name}"] = node
    for path, node in nodes.items():
        if not isinstance(node, DictConfig) or not str(node.get("_target_", "")).startswith("dq."):
            continue
        try:
            target = hydra.utils.get_class(node._target_)
        except (ImportError, ValueError) as e:  # nothing at that path / something that is not a class
            raise ConfigError(f"{path}._target_={node._target_} names no class of dq: {e}") from None
        accepted = accepted_settings(target)
        if accepted is None:
            continue
        if unknown := [k for k in node if not str(k).startswith("_") and k not in accepted]:
            settings = sorted(accepted - {"teacher", "student", "calib", "run_dir", "fingerprint", "seed"})
            raise ConfigError(
                f"{', '.join(f'{path}.{k}' for k in unknown)}: not a setting of {target.__name__} ({path}). "
                f"{_setting_hint(path, node, unknown, settings)}Its settings are {settings}; check the spelling, "
                "or drop the '+' override."
            )


def _setting_hint(path: str, node: DictConfig, unknown: list[str], settings: list[str]) -> str:
    """'Did you mean ...?' for misspelt settings, and which other option of the group takes a setting as named
    (`distill=model_kd +distill.iters_per_block=...`: a setting of distill=bkd)."""
    hints = []
    for key in unknown:
        if close := difflib.get_close_matches(key, settings, n=2, cutoff=0.6):
            hints.append(f"{path}.{key}: did you mean {' or '.join(f'{path}.{c}' for c in close)}?")
        if path != "distill":  # a callback or logger has one class per name: no other option to point to
            continue
        if owners := sorted(f.stem for f in Path(conf_dir(), path).glob("*.yaml") if key in OmegaConf.load(f)):
            hints.append(f"{path}.{key} is a setting of {' and '.join(f'{path}={o}' for o in owners)}, "
                         f"not of {path}={node.get('name', '?')}.")  # fmt: skip
    return " ".join(hints) + (" " if hints else "")


# pl.Trainer arguments that dq-train sets itself: from the distillation (steps), the callbacks and logger groups, the
# run directory, and dq's own per-block checkpoints
TRAINER_SET_BY_DQ = ("max_steps", "max_epochs", "callbacks", "logger", "default_root_dir", "enable_checkpointing")
# pl.Trainer arguments that dq-pretrain sets itself
PRETRAIN_SETS = ("logger", "default_root_dir", "enable_checkpointing", "callbacks")
# pl.Trainer arguments that end a fit early without marking it interrupted: dq-train would save and score a student
# whose later blocks (or steps) never trained, under the config's step count
# pl.Trainer's settings typed bool (False) or bool | None (True: null allowed)
TRAINER_SWITCHES = {
    name: p.annotation is not bool
    for name, p in inspect.signature(pl.Trainer.__init__).parameters.items()
    if p.annotation in (bool, bool | None)
}
TRAINER_CUTS_SHORT = ("max_time", "limit_train_batches", "fast_dev_run", "overfit_batches")


def check_callbacks(cfg: DictConfig) -> None:
    """Refuse callback settings that would break the run after calibration or write outside the run directory."""
    steps, table = OmegaConf.select(cfg, "callbacks.tpq.num_steps"), OmegaConf.select(cfg, "model.num_inference_steps")
    if steps is not None and table is not None and steps != table:
        raise ConfigError(
            f"callbacks.tpq.num_steps={steps!r} is invalid: TPQ keeps one range per sampling step, so leave it null "
            f"(model.num_inference_steps, here {table}) or set model.num_inference_steps instead."
        )


def check_trainer(cfg: DictConfig) -> None:
    """Refuse at start-up a `trainer.<key>` that `pl.Trainer` does not take, or one that dq-train sets itself."""
    trainer = OmegaConf.select(cfg, "trainer")
    if not isinstance(trainer, DictConfig):
        return
    accepted = accepted_settings(pl.Trainer) or set()
    if unknown := [k for k in trainer if k not in accepted]:
        raise ConfigError(
            f"{', '.join(f'trainer.{k}' for k in unknown)}: not an argument of pytorch_lightning.Trainer "
            f"{pl.__version__}; check the spelling, or drop the '+' override."
        )
    if ours := [k for k in trainer if k in TRAINER_SET_BY_DQ]:
        raise ConfigError(
            f"{', '.join(f'trainer.{k}' for k in ours)}: set by dq-train itself (steps from distill.iters_per_block "
            "or distill.iters, callbacks and loggers from their groups, checkpoints per block in the run directory); "
            "drop the override."
        )
    clip, accumulate = trainer.get("gradient_clip_val"), trainer.get("accumulate_grad_batches", 1)
    if (isinstance(clip, int | float) and clip > 0) or accumulate not in (None, 1):
        raise ConfigError(
            f"trainer.gradient_clip_val={clip}, trainer.accumulate_grad_batches={accumulate}: dq's distillation steps "
            "its optimizers itself (manual optimization), which Lightning's automatic clipping and accumulation do "
            "not support; drop the override (distill.batch_size sets the batch)."
        )
    if trainer.get("barebones"):
        raise ConfigError(
            "trainer.barebones=true turns off the logging, progress bars and checkpoint hooks dq-train runs through "
            "Lightning; drop it (logger=none and eval.progress=false turn off logs and bars)."
        )
    if short := [k for k in trainer if k in TRAINER_CUTS_SHORT]:
        raise ConfigError(
            f"{', '.join(f'trainer.{k}' for k in short)}: would end the distillation early and save a student whose "
            "later blocks never trained; shorten it with distill.iters_per_block (distill=bkd) or distill.iters "
            "instead, and drop the override."
        )


# dq-pretrain's counts (whole numbers >= 1, where the chosen pretrain config has them) and ranges [lo, hi)
PRETRAIN_COUNTS = (
    "pretrain.module.scheduler.num_train_timesteps", "pretrain.module.width", "pretrain.module.feat_dim",
)  # fmt: skip
PRETRAIN_RANGES = {
    "pretrain.module.ema_decay": (0, 1, "the weight of the weight average's past (0.999)"),
    "pretrain.module.warmup_steps": (0, math.inf, "the learning-rate warm-up in steps"),
    "pretrain.module.max_shift": (0, math.inf, "the largest random shift of a training digit in pixels"),
}


def _number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def check_pretrain(cfg: DictConfig) -> None:
    """dq-pretrain's start-up checks: the seed, the learning rate, counts, and the trainer settings (`trainer` and
    `pretrain.trainer` together, as the run passes them to `pl.Trainer`)."""
    _check_whole_numbers(cfg, ("pretrain.data.batch_size", "pretrain.trainer.max_steps", "pretrain.trainer.max_epochs"),
                         ("seed",))  # fmt: skip
    check_path_names(cfg)
    lr = OmegaConf.select(cfg, "pretrain.module.lr")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, int | float) or not lr > 0):
        raise ConfigError(f"pretrain.module.lr={lr!r} is invalid: a learning rate must be a number > 0.")
    _check_whole_numbers(cfg, PRETRAIN_COUNTS, ("pretrain.data.seed",))
    _check_ranges(cfg, PRETRAIN_RANGES)
    start, end = (OmegaConf.select(cfg, f"pretrain.module.scheduler.beta_{k}") for k in ("start", "end"))
    if start is not None and end is not None and not (_number(start) and _number(end) and 0 < start < end < 1):
        raise ConfigError(
            f"pretrain.module.scheduler.beta_start={start!r}, beta_end={end!r}: the noise schedule needs "
            "0 < beta_start < beta_end < 1 (DDPM: 0.0001 and 0.02)."
        )
    unet_in, unet_out = (OmegaConf.select(cfg, f"pretrain.module.unet.{k}_channels") for k in ("in", "out"))
    if unet_in is not None and unet_in != 1:
        raise ConfigError(f"pretrain.module.unet.in_channels={unet_in!r} is invalid: the teacher trains on MNIST, 1.")
    if unet_out is not None and unet_out != unet_in:
        raise ConfigError(
            f"pretrain.module.unet.out_channels={unet_out!r} is invalid: the teacher predicts the noise of its input, "
            f"so out_channels = in_channels ({unet_in})."
        )
    trainer, own = (OmegaConf.select(cfg, k) or {} for k in ("trainer", "pretrain.trainer"))
    if both := [k for k in trainer if k in own]:  # pretrain.trainer wins when both are passed to pl.Trainer
        ours = ", ".join(f"pretrain.trainer.{k}" for k in both)
        raise ConfigError(
            f"{', '.join(f'trainer.{k}' for k in both)}: pretrain={OmegaConf.select(cfg, 'pretrain.name')} sets it in "
            f"pretrain.trainer, which dq-pretrain passes last: override {ours} instead."
        )
    parts = {k: p for k in ("trainer", "pretrain.trainer") if (p := OmegaConf.select(cfg, k)) is not None}
    if ours := [f"{section}.{k}" for section, part in parts.items() for k in part if k in PRETRAIN_SETS]:
        raise ConfigError(
            f"{', '.join(ours)}: set by dq-pretrain itself (loggers from the logger group, the run directory, the "
            "exported model instead of Lightning checkpoints); drop the override."
        )
    merged = {k: v for part in parts.values() for k, v in OmegaConf.to_container(part, resolve=True).items()}
    check_trainer_values(OmegaConf.create({"trainer": merged}), one_process=False)  # plain Lightning training


def check_trainer_values(cfg: DictConfig, one_process: bool = True) -> None:
    """Refuse at start-up a `trainer.<key>` value `pl.Trainer` refuses: one made now, with nothing to run, says what
    the real one would say after calibration. `one_process` (dq-train): refuse several processes but with
    `trainer.strategy=dq_ddp` (`check_block_parallel`); otherwise (dq-pretrain) refuse dq_ddp."""
    trainer = OmegaConf.select(cfg, "trainer")
    if not isinstance(trainer, DictConfig):
        return
    kwargs = OmegaConf.to_container(trainer, resolve=True)
    for key, value in kwargs.items():  # Lightning takes any truthy value for a switch ("maybe", 3) without a word
        if key in TRAINER_SWITCHES:
            _check_switch(f"trainer.{key}", value, nullable=TRAINER_SWITCHES[key])
    devices = kwargs.get("devices", "auto")
    if kwargs.get("strategy") == STRATEGY and type(devices) is int and devices > 1 and not ddp_child():
        check_own_processes(kwargs)  # before Lightning's own check of the devices against srun's tasks
    quiet = logging.getLogger("pytorch_lightning.utilities.rank_zero")  # its "GPU available: ..." lines come later
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        dry = pl.Trainer(**{**kwargs, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False})
    except Exception as e:  # Lightning raises several types for a bad value
        raise ConfigError(f"trainer: pytorch_lightning.Trainer refuses these settings: {e}") from e
    finally:
        quiet.setLevel(level)
    if one_process and dry.world_size > 1 and not isinstance(dry.strategy, BlockParallelStrategy):
        raise ConfigError(
            f"trainer.devices={kwargs.get('devices', 'auto')}, trainer.num_nodes={kwargs.get('num_nodes', 1)}, "
            f"trainer.strategy={kwargs.get('strategy', 'auto')}: {dry.world_size} processes with Lightning's "
            f"{type(dry.strategy).__name__}, whose DDP wrapper fixes the trained parameters when the fit starts, and "
            f"dq-train trains one block's at a time. Use trainer=ddp (trainer.strategy={STRATEGY}), which dq-train "
            "and dq-eval take, or trainer.devices=1."
        )
    if isinstance(dry.strategy, BlockParallelStrategy):
        if dry.world_size > 1 and not ddp_child():  # devices=-1 / auto that come to several
            check_own_processes(kwargs)
        check_block_parallel(cfg, kwargs, one_process)
    if one_process and dry.world_size > 1 and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise ConfigError(
            f"trainer.strategy={STRATEGY} with {dry.world_size} processes in a multirun (-m): Lightning starts the "
            "other processes by re-running the command, so each would run the whole sweep. Run each setting as its "
            "own command, or sweep with trainer.devices=1."
        )
    if str(dry.precision).startswith("64"):
        raise ConfigError(
            f"trainer.precision={kwargs.get('precision')} trains in float64, and dq's teacher, calibration set and "
            "student are float32: drop the override (32-true, the default) or use 16-mixed / bf16-mixed."
        )
    if str(dry.precision) in ("16-true", "bf16-true"):
        raise ConfigError(
            f"trainer.precision={kwargs.get('precision')} casts the student to half precision, so its latent weights "
            "would train in steps of 2^-11 (2^-8) of themselves and start snapped onto their grid: use "
            f"{str(dry.precision).replace('-true', '-mixed')} (autocast; the latent weights stay in float32)."
        )


def check_own_processes(trainer: dict[str, Any]) -> None:
    """`trainer.strategy=dq_ddp` starts its processes itself: refuse a command that srun or torchrun started as one of
    several, where Lightning would start none (and each started process would be a run of its own)."""
    launcher = external_launcher()
    if launcher is None:
        return
    how = {
        "srun": "a SLURM task (SLURM_NTASKS is set)",
        "torchrun": "one of the processes torchrun started (TORCHELASTIC_RUN_ID is set)",
    }[launcher]
    raise ConfigError(
        f"trainer.strategy={STRATEGY} (trainer=ddp) with trainer.devices={trainer.get('devices', 'auto')} starts one "
        f"process per GPU itself, and this command runs as {how}, so Lightning would start none. Use trainer=gpu (one "
        "GPU per command; hydra/launcher=slurm gives each job of a sweep its own), or start the command once, "
        "outside srun / torchrun (under SLURM, in a job named interactive, which Lightning does not take for srun's)."
    )


def check_block_parallel(cfg: DictConfig, trainer: dict[str, Any], one_process: bool) -> None:
    """`trainer.strategy=dq_ddp`: dq-train (its distillation sums its own gradients) and dq-eval only, on one machine,
    on the first N devices (each process takes the GPU of its local rank) and a `device` without an index."""
    if not one_process:
        raise ConfigError(
            f"trainer.strategy={STRATEGY} is dq-train's (its distillation sums the gradients itself) and dq-eval's; "
            "dq-pretrain trains one process per device with Lightning's own strategy=ddp."
        )
    if trainer.get("num_nodes", 1) != 1:
        raise ConfigError(
            f"trainer.num_nodes={trainer['num_nodes']} with trainer.strategy={STRATEGY}: trainer=ddp runs on one "
            "machine (one process per GPU); use trainer.num_nodes=1."
        )
    devices = trainer.get("devices", "auto")
    if not (devices == "auto" or (type(devices) is int and devices >= -1)):
        raise ConfigError(
            f"trainer.devices={devices!r} with trainer.strategy={STRATEGY}: give a number of devices (-1: all); to use "
            "particular GPUs, name them in CUDA_VISIBLE_DEVICES (each process takes the GPU of its local rank)."
        )
    if ":" in str(cfg.get("device", "")):
        raise ConfigError(
            f"device={cfg.device} with trainer.strategy={STRATEGY}: each process uses the device of its local rank; "
            f"pass device={str(cfg.device).split(':')[0]} (and CUDA_VISIBLE_DEVICES to pick GPUs)."
        )


EVAL_TRAINER_KEYS = ("accelerator", "devices", "strategy")  # what dq-eval reads of the trainer group: where it samples


def check_eval_trainer(overrides: Sequence[str]) -> None:
    """dq-eval samples where the trainer group says (`trainer=gpu`, `trainer=ddp`) and trains nothing: refuse an
    override of another `trainer.<key>`, which would do nothing there."""
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        group, _, key = override.key_or_group.partition(".")
        if group == "trainer" and key and key.split(".")[0] not in EVAL_TRAINER_KEYS:
            raise ConfigError(
                f"trainer.{key}: dq-eval trains nothing and reads only trainer.accelerator, trainer.devices and "
                "trainer.strategy (where it samples: trainer=gpu, trainer=ddp); drop the override"
                + (" (eval.dtype sets the sampling precision)." if key == "precision" else ".")
            )


def check_eval_bits(cfg: DictConfig, overrides: Sequence[str], multirun: bool) -> None:
    """dq-eval: `bits` shapes a student built here. Refuse it beside `quantizer=fp` (the default: the teacher alone)
    or `student_dir` (a saved student keeps its bit-widths), which would ignore it; a multirun's jobs may sweep
    quantizer=fp beside PTQ students at one `bits`."""
    given = [
        o for o in OverridesParser.create().parse_overrides(list(overrides)) if o.key_or_group.split(".")[0] == "bits"
    ]
    if multirun or not given:
        return
    if cfg.get("student_dir"):
        raise ConfigError(
            f"{given[0].input_line}: student_dir={cfg.student_dir} scores the saved student at the bit-widths it was "
            "trained with (its quant_spec.json); drop the override."
        )
    if cfg.quantizer.name == "fp":
        raise ConfigError(
            f"{given[0].input_line}: quantizer=fp (dq-eval's default) scores the full-precision teacher alone; for a "
            f"post-training quantized student pass quantizer=ptq_minmax {given[0].input_line}."
        )


# groups whose settings dq reads by name, with no class to check them: every setting dq reads is in one of the
# group's yaml files
READ_BY_NAME = ("model", "quantizer", "bits", "calib", "eval")


def check_appended(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Refuse a `+<group>.<key>=...` (or `++`) that adds a setting dq never reads to model, quantizer, bits, calib
    or eval: Hydra suggests the `+` after a typo (`eval.nsamples`), and the value would then be ignored."""
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        group, _, key = override.key_or_group.partition(".")
        if not (override.is_add() or override.is_force_add()) or group not in READ_BY_NAME or not key:
            continue
        # eval=none samples nothing: of the eval settings it reads only its own (progress, cache_dir)
        option = "none" if group == "eval" and OmegaConf.select(cfg, "eval.features") == "none" else "*"
        known = set()
        for file in Path(conf_dir(), group).glob(f"{option}.yaml"):
            known |= _dotted_keys(OmegaConf.to_container(OmegaConf.load(file), resolve=False))
        if group == "quantizer":  # every QuantSpec field but the bit-widths, which the bits group sets
            known |= {f"spec.{f.name}" for f in dataclasses.fields(QuantSpec) if f.name not in SET_BY_BITS}
        if key in known:
            continue
        what = "eval=none samples nothing, so " if option == "none" else ""
        close = difflib.get_close_matches(key, sorted(known), n=2, cutoff=0.6)
        hint = f"Did you mean {' or '.join(f'{group}.{k}' for k in close)}? " if close else ""
        raise ConfigError(
            f"{override.input_line}: {what}dq reads no {group}.{key}, and the value would change nothing. "
            f"{hint}Check the spelling, or drop the override."
        )


def _dotted_keys(node: object, prefix: str = "") -> set[str]:
    """Every key of a nested dict as a dotted path (`spec`, `spec.act_init`, ...)."""
    if not isinstance(node, dict):
        return set()
    return {p for k, v in node.items() for p in (f"{prefix}{k}", *_dotted_keys(v, f"{prefix}{k}."))}


def check_adapters(cfg: DictConfig) -> None:
    """The `lora` callback and `distill.lr_lora` only make sense together: refuse either one alone."""
    with_lora = OmegaConf.select(cfg, "callbacks.lora") is not None
    lr = OmegaConf.select(cfg, "distill.lr_lora", default=None)
    if with_lora and not (isinstance(lr, int | float) and lr > 0):
        raise ConfigError(
            f"callbacks.lora adds low-rank adapters that distill.lr_lora={lr} leaves untrained "
            f"(distill={OmegaConf.select(cfg, 'distill.name')}): set distill.lr_lora > 0 with distill=model_kd or bkd "
            "(experiment=efficientdm does), or leave the callback out"
        )
    if not with_lora and isinstance(lr, int | float) and lr > 0:
        raise ConfigError(
            f"distill.lr_lora={lr} trains low-rank adapters, but no callbacks.lora adds them: add it "
            "(callbacks=efficientdm, or experiment=efficientdm), or set distill.lr_lora=0"
        )
