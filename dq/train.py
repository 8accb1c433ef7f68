"""`dq-train`: quantize the teacher, distill the student (BKD by default) with the configured callbacks (Weight
Dilation, TPQ), save it, and evaluate teacher and student from identical noise.

Run directory: the composed config (`.hydra/`), `checkpoints/` (per-block), `dilation.json`, `student/`
(`load_quantized`), `results.json`, `samples.png`, `csv/` and `wandb/` logs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from dq.config import (
    build_loggers,
    cli_errors,
    keep_hydra_record,
    log_config,
    register_resolvers,
    restoring_hydra_record,
)
from dq.distill import BlockwiseDistillation
from dq.distill.calibration import teacher_fingerprint
from dq.distill.checkpoint import checkpoint_fingerprint, finished_checkpoint, state_equal
from dq.distill.parallel import (
    check_equal_students,
    ddp_child,
    join_parent,
    leaving_process_group,
    mark_parent,
    wait_for_parent,
    world,
)
from dq.errors import ConfigError, UserError
from dq.evaluation import calibration_noise_overlap, evaluate_models, method_of
from dq.models import check_inference_steps, check_sample_shape, check_unconditional, load_teacher
from dq.paths import conf_dir, run_dir_lock
from dq.quant import load_quantized, save_quantized
from dq.quant.io import SPEC_NAME
from dq.student import calibration_set, check_layers, check_spec, quantize_student
from dq.utils.fit import known_fit_warnings
from dq.utils.io import atomic_write_text, changed_keys, read_json_object, remove_unfinished_writes
from dq.utils.loggers import ending_wandb_run
from dq.utils.progress import progress_bar
from dq.utils.provenance import code_at_start
from dq.utils.signals import signal_exit_status
from dq.validation import validate

log = logging.getLogger("dq.train")  # not __name__, which is __main__ under python -m

register_resolvers()

FINGERPRINT_KEYS = ("model", "quantizer", "bits", "distill", "callbacks", "calib", "seed")  # what shapes the student
# options added after runs existed, at the value that changes nothing: left out of the fingerprint there, so a run
# started before the option existed still resumes its block checkpoints
NEUTRAL_OPTIONS: dict[str, object] = {
    "distill.act_drop_prob": 0.0,
    "quantizer.spec.fp_output_layer_input": False,
    "distill.lr_lora": 0,
    "callbacks.tpq.init": "per_step",
    "distill.dampen": 0.0,
    "distill.freeze": 0.0,
    "distill.lr_zero_point": None,
    "distill.adam_eps": 1e-8,
    "quantizer.spec.clip_first": False,
    "distill.lr_rounding": 0,
    "distill.rounding_reg": 0.01,
}


def config_fingerprint(cfg: DictConfig, teacher: torch.nn.Module, scheduler: Any) -> str:
    """sha256 of the config sections that determine the trained student, of the teacher's weights and of the
    scheduler's config (`fingerprint_parts`). Where the model lies (`model.path`) and the FID reference data
    (`model.data`) are left out: the same teacher copied elsewhere, or a moved checkout, resumes its block
    checkpoints."""
    return _digest(fingerprint_parts(cfg, teacher, scheduler))


def _digest(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint_parts(cfg: DictConfig, teacher: torch.nn.Module, scheduler: Any) -> dict[str, Any]:
    """What `config_fingerprint` hashes: the student-shaping config sections, the teacher's weight digest and the
    scheduler config, without the keys that change nothing (presentation, location, neutral new options)."""
    parts = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
             for k in FINGERPRINT_KEYS if k in cfg}  # fmt: skip
    parts["teacher"] = teacher_fingerprint(teacher)
    parts["scheduler"] = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    # presentation, batching of no-grad passes, location, evaluation data: none changes the student
    for section, keys in {"distill": ("progress", "calib_batch_size"), "model": ("path", "data")}.items():
        for key in keys:
            (parts.get(section) or {}).pop(key, None)
    for path, value in NEUTRAL_OPTIONS.items():
        *sections, key = path.split(".")
        part = parts
        for section in sections:
            part = part.get(section) if isinstance(part, dict) else None
        if isinstance(part, dict) and part.get(key, value) == value:
            part.pop(key, None)
    # mixed precision trains another student; float32, Lightning's default and every run's before this key, is out
    if (precision := str(OmegaConf.select(cfg, "trainer.precision", default="32-true"))) not in ("32", "32-true"):
        parts["trainer.precision"] = precision
    return parts


def check_resumable(checkpoint_dir: Path, parts: dict[str, Any], fingerprint: str) -> bool:
    """Refuse, before anything in the run changes, block checkpoints written by another configuration, or (a run
    without them: distill=model_kd / none) a finished student trained with another one; name the keys that differ
    when the run kept its `config.json` (older runs did not). Write that file for a fresh run, and keep the accepted
    command's Hydra record (`keep_hydra_record`).

    Returns whether the run directory holds a student and no block checkpoints, and its kept `config.json` equals
    `parts`: a finished whole-model run (distill=model_kd / none) of this configuration."""
    saved = checkpoint_fingerprint(checkpoint_dir)
    config_file = checkpoint_dir / "config.json"
    # a finished run without block checkpoints (distill=model_kd / none): its student is not replaced by another one
    finished = saved is None and (checkpoint_dir.parent / "student").is_dir()
    changed = _differs(config_file, parts) if finished or saved not in (None, fingerprint) else []
    if saved == fingerprint or (saved is None and not changed):
        same_finished = finished and bool(read_json_object(config_file))  # read before it is written again
        try:  # a checkpoint is written after each block: a directory that takes none fails now, not after one
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=checkpoint_dir).close()
            if saved is None or not config_file.is_file():  # a fresh run, or one started before dq kept the file
                atomic_write_text(config_file, json.dumps(parts, indent=2, sort_keys=True, default=str))
        except OSError as e:
            raise ConfigError(
                f"cannot write in {checkpoint_dir} ({type(e).__name__}: {e}), where dq-train writes a checkpoint "
                "after each block: make it writable, or pass another hydra.run.dir=..."
            ) from e
        keep_hydra_record()
        return same_finished
    what = f" ({', '.join(changed[:8])}{', ...' if len(changed) > 8 else ''} differ)" if changed else ""
    if finished:
        raise ConfigError(
            f"{checkpoint_dir.parent} holds a student trained with another configuration{what}; nothing was changed. "
            "Use a new run directory, or re-run with the settings of that run to train it again."
        )
    raise ConfigError(
        f"{checkpoint_dir} holds blocks trained with another configuration{what}; nothing was changed. Re-run with "
        f"the settings of that run to resume it, use a new run directory, or delete {checkpoint_dir} to start over."
    )


def _differs(config_file: Path, parts: dict[str, Any]) -> list[str]:
    """The keys in which a run's kept `config.json` differs from `parts` ([]: the same, or no readable file)."""
    old = read_json_object(config_file)  # {}: a run started before dq kept the file, or a damaged one
    return changed_keys(old, parts) if old else []


def build_callbacks(callbacks_cfg: DictConfig | None) -> list[pl.Callback]:
    """Instantiate the `callbacks` group, sorted by each callback's `order` (Weight Dilation before TPQ)."""
    callbacks = [hydra.utils.instantiate(c) for c in (callbacks_cfg or {}).values() if c is not None]
    return sorted(callbacks, key=lambda c: getattr(c, "order", 100))


def reset_peak_memory() -> None:
    """Start a fresh peak-memory window, so each job of a Hydra multirun (one process) reports its own peak.

    Linux resets the peak resident set size (VmHWM) on writing "5" to /proc/self/clear_refs; elsewhere the
    peak stays the process's lifetime peak (`ru_maxrss`).
    """
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict[str, float]:
    """Peak resident memory (MB) since `reset_peak_memory`, plus peak CUDA memory when CUDA was used."""
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # a lifetime peak; KiB, but bytes on macOS
        if sys.platform == "darwin":
            kib /= 1024
    out = {"peak_mem_mb": kib / 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


@ending_wandb_run()  # a multirun's next job (same process) must not log into this job's W&B run
def train(cfg: DictConfig) -> dict[str, Any]:
    """Quantize, distill, save and evaluate; returns the contents of `results.json`."""
    code_at_start()  # results.json's provenance names the code as the run starts, whatever is committed later
    if child := ddp_child():  # trainer=ddp: a process the first one started; what it would print, the first prints
        join_parent(cfg)
    validate(cfg)
    if cfg.quantizer.name == "fp":
        raise ConfigError("quantizer=fp has nothing to train: evaluate the teacher with dq-eval instead")
    tpq = "tpq" in (cfg.get("callbacks") or {})
    if (temporal := cfg.quantizer.get("temporal")) is not None and bool(temporal) != tpq:
        raise ConfigError(
            f"quantizer.temporal={str(temporal).lower()} (quantizer={cfg.quantizer.name}), but dq-train makes "
            f"activation ranges per step with the TPQ callback, which the callbacks {list(cfg.get('callbacks') or {})} "
            f"{'include' if tpq else 'leave out'}: pass quantizer.temporal={str(tpq).lower()}, or callbacks "
            f"{'without' if tpq else 'with'} tpq, so that results.json records what trained."
        )
    check_spec(cfg)
    pl.seed_everything(cfg.seed, verbose=False)
    reset_peak_memory()
    run_dir = Path(cfg.run_dir)
    if (run_dir / "results.json").is_file() and not any((run_dir / d).exists() for d in ("checkpoints", "student")):
        raise ConfigError(
            f"run_dir={run_dir} holds a dq-eval run (results.json, and no checkpoints/ or student/): dq-train would "
            "overwrite its results.json and samples.png. Train into a new directory (hydra.run.dir=...)."
        )
    if cfg.eval.features == "none" and "student" in read_json_object(run_dir / "results.json"):
        raise ConfigError(
            f"eval=none would replace the scores in {run_dir / 'results.json'} with the cost alone: re-run that run "
            "with its own eval settings, or use a new run directory."
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    if child:  # inside its parent's lock
        try:
            return _quantize_distill_evaluate(cfg, run_dir)
        except UserError:  # raised in every process (a non-finite loss): the parent reports it
            wait_for_parent()
            raise
    with run_dir_lock(run_dir):  # one writer per run directory
        return _quantize_distill_evaluate(cfg, run_dir)


def _quantize_distill_evaluate(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """`train` inside the run-directory lock."""
    loggers = build_loggers(cfg.logger)  # checks their save_dirs, before check_resumable writes checkpoints/config.json
    teacher, scheduler = load_teacher(cfg.model.path)
    check_unconditional(teacher)
    check_sample_shape(teacher, cfg.model.sample_shape)
    check_inference_steps(scheduler, cfg.model.num_inference_steps)
    check_layers(cfg, teacher)
    parts = fingerprint_parts(cfg, teacher, scheduler)  # the teacher hashed once, on the CPU as loaded (dq-eval too)
    teacher.to(cfg.device)
    fingerprint = _digest(parts)
    whole_model_done = check_resumable(run_dir / "checkpoints", parts, fingerprint)  # before anything is written
    whole_model_done &= not issubclass(hydra.utils.get_class(cfg.distill._target_), BlockwiseDistillation)
    log.info(f"run directory: {run_dir}")  # past the checks that refuse a command (its directory is then removed)
    if not ddp_child():  # the one writer here: what an attempt killed mid-write left is removed
        for folder in ("checkpoints", "student"):
            for left in remove_unfinished_writes(run_dir / folder):
                log.info(f"removed {left}, an unfinished write of an earlier attempt")
        log_config(loggers, cfg)
    if cfg.eval.features != "none" and (overlap := calibration_noise_overlap(cfg)):
        log.warning(overlap)

    if (saved := _finished_student(run_dir, fingerprint, cfg.device, whole_model_done)) is not None:
        student, cost = saved
        done = "the student of this configuration is trained and" if whole_model_done else "every block is trained and"
        log.info(f"{done} the student saved in {run_dir / 'student'}: evaluating it")
        return evaluate_models(cfg, teacher, scheduler, student, run_dir, loggers, method_of(cfg), cost)

    start = time.perf_counter()
    callbacks = build_callbacks(cfg.get("callbacks"))  # before calibration: a setting they refuse costs nothing yet
    student = quantize_student(cfg, teacher, scheduler)
    calib = calibration_set(cfg, teacher, scheduler)
    # a partial, then the objects: instantiate would turn the CalibrationSet dataclass into a DictConfig
    make_module = hydra.utils.instantiate(cfg.distill, _partial_=True)
    module = make_module(
        teacher=teacher, student=student, calib=calib, run_dir=run_dir, seed=cfg.seed, fingerprint=fingerprint
    )
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    # the batches are step indices, the same in every process (trainer=ddp shards each minibatch itself)
    trainer_kwargs |= {"max_steps": module.max_steps, "max_epochs": 1, "use_distributed_sampler": False}
    # eval.progress=false silences every bar of the run (sweeps log to files), the trainer's included
    trainer_kwargs["enable_progress_bar"] = bool(trainer_kwargs.get("enable_progress_bar", True) and cfg.eval.progress)
    trainer = pl.Trainer(
        **trainer_kwargs, logger=loggers or False,
        callbacks=callbacks + progress_bar(trainer_kwargs["enable_progress_bar"], "distillation"),
        default_root_dir=str(run_dir), enable_checkpointing=False,
    )  # fmt: skip

    def resume() -> str:  # what an interrupted run can do next (only BKD keeps per-block checkpoints)
        if checkpoint_fingerprint(run_dir / "checkpoints") is None:
            return "training was interrupted before any checkpoint was written: a re-run starts over"
        kept = f"training was interrupted; the finished blocks are kept in {run_dir / 'checkpoints'}"
        if os.environ.get("SUBMITIT_EXECUTOR"):  # a job of Hydra's submitit launcher (hydra/launcher=slurm)
            return (
                f"{kept}: the job resumes from them where submitit requeues it (hydra.launcher.max_num_timeout), "
                "or when the same sweep runs again (the same command and hydra.sweep.dir)"
            )
        return f"{kept}: re-run the same command with hydra.run.dir={run_dir} to resume"

    with known_fit_warnings(
        r".*Total length of `.*` across ranks is zero.*",  # a finished run re-run has no batches (BKD says so)
        ".*returned `None`, this fit will run with no optimizer.*",
        r".*module\(s\) in eval mode at the start of training.*",  # intended: the student trains in eval mode
    ):
        try:
            with signal_exit_status(trainer), mark_parent():
                trainer.fit(module)
        except SystemExit:  # Lightning ends the process after Ctrl-C or SIGTERM, once it has shut down
            if trainer.interrupted:
                log.warning(resume())
            raise
    if trainer.interrupted:
        raise RuntimeError(resume())
    train_s = time.perf_counter() - start
    with leaving_process_group(trainer.strategy):  # trainer=ddp: every process samples its share of the evaluation
        return _save_evaluate(
            cfg, run_dir, loggers, teacher, scheduler, student, module, parts, train_s, trainer.world_size
        )


def _save_evaluate(
    cfg: DictConfig,
    run_dir: Path,
    loggers: list,
    teacher: torch.nn.Module,
    scheduler: Any,
    student: torch.nn.Module,
    module: pl.LightningModule,
    parts: dict[str, Any],
    train_s: float,
    processes: int,
) -> dict[str, Any]:
    """After the fit: the first process saves the student and its cost; every process (trainer=ddp) samples its
    share of the evaluation, and the first scores it (`evaluate_models`; {} in the others)."""
    peaks = []
    if processes > 1:  # the students are equal (or the run fails here)
        check_equal_students(student)
        peaks = [None] * processes
        torch.distributed.all_gather_object(peaks, peak_memory())
    teacher.to(cfg.device).eval()
    student.to(cfg.device).eval().requires_grad_(False)
    if world()[0] > 0:
        return evaluate_models(cfg, teacher, scheduler, student, run_dir, loggers, method_of(cfg))
    save_quantized(student, run_dir / "student", teacher=parts["teacher"])
    reverted = untrained_blocks(getattr(module, "history", []))
    if reverted:  # each was named as it happened; the sum, where a whole run's training may have been undone
        every = len(reverted) == len(module.blocks)
        log.warning(
            f"{len(reverted)} of {len(module.blocks)} blocks kept untrained (training raised their calibration MSE): "
            f"{', '.join(reverted)}"
            + (". Every block: the learning rates (distill.lr_*) are likely too high for this model" if every else "")
        )
    cost = {
        "train_s": train_s,
        **peak_memory(),  # the first process's, saving included
        "steps": int(module.max_steps),
        "processes": processes,
        "resumed_at_step": int(module.start_step),
        "blocks": len(getattr(module, "blocks", [])),
        "reverted_blocks": reverted,
        "block_s": getattr(module, "block_seconds", {}),  # BKD: seconds per block, across resumes
    }
    if processes > 1:  # every process's, as training ended
        for key in peaks[0]:  # peak_mem_mb, and peak_gpu_mem_mb on GPUs
            cost[f"process_{key}"] = [p.get(key) for p in peaks]
    return evaluate_models(cfg, teacher, scheduler, student, run_dir, loggers, method_of(cfg), cost)


def untrained_blocks(history: list[dict[str, Any]]) -> list[str]:
    """The blocks of a BKD history that `revert_worse` put back untrained (training raised their MSE)."""
    return [h["block"] for h in history if h.get("kept") == "untrained"]


def _finished_student(
    run_dir: Path, fingerprint: str, device: str, whole_model_done: bool = False
) -> tuple[torch.nn.Module, dict] | None:
    """A re-run of a finished run (a requeued job, a re-scoring): the saved student, with the run's cost (its earlier
    results.json's, or what the block checkpoints record); None otherwise, and the run trains (or resumes) as usual.
    BKD: when the block checkpoints hold every block of this configuration and the student equals their state.
    distill=model_kd / none (no block checkpoints): when `whole_model_done` (`check_resumable`: the student was saved
    under this configuration). Weight Dilation, the TPQ calibration and the training they would repeat are skipped."""
    meta, state = finished_checkpoint(run_dir / "checkpoints", fingerprint)
    if not (meta or whole_model_done) or not (run_dir / "student" / SPEC_NAME).is_file():
        return None
    try:
        student = load_quantized(run_dir / "student")
    except Exception:  # damaged or from another dq: train (resume) as usual, which saves it again
        return None
    if meta and not state_equal(student.state_dict(), state):
        return None
    cost = read_json_object(run_dir / "results.json").get("cost")  # the training's, where a start scored it
    cost = cost if isinstance(cost, dict) else {}
    if "train_s" not in cost and meta:  # never scored: what the block checkpoints record of the training
        cost = {"blocks": len(meta["blocks"]), "block_s": meta.get("block_seconds") or {},
                "reverted_blocks": untrained_blocks(meta.get("history") or [])}  # fmt: skip
    return student.to(device).eval().requires_grad_(False), {**cost, "evaluated_saved_student": True}


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="train")
def main(cfg: DictConfig) -> None:
    with cli_errors("dq-train"), restoring_hydra_record():
        train(cfg)


if __name__ == "__main__":  # python -m dq.train
    # run from the importable dq.train: a Hydra launcher that pickles the task function (submitit) pickles it by
    # value, and its globals then resolve to dq.train by reference; as __main__'s they would be pickled (and fail)
    from dq.train import main as importable_main

    sys.exit(importable_main())
