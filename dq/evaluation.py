"""Evaluation shared by `dq-eval` and `dq-train`: sample teacher and student from identical noise, score, report."""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger, WandbLogger
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dq.data import reference_images, reference_name
from dq.distill.calibration import resolve_n_traj, teacher_fingerprint
from dq.distill.parallel import barrier, batch_share, first_decides, gather_in_order, world
from dq.errors import NonFiniteSamplesError, UserError
from dq.metrics import SampleMetrics, non_finite_count, psnr
from dq.models import ddim_sample, make_noise
from dq.quant.quantizer import HALF_DTYPES
from dq.utils.grid import grid_array, save_png, side_by_side
from dq.utils.io import atomic_write_text, write_cache
from dq.utils.provenance import provenance

log = logging.getLogger(__name__)


def eval_dtype(cfg: DictConfig) -> torch.dtype:
    """The dtype models sample in (`eval.dtype`, float32 when the config has none)."""
    return getattr(torch, cfg.eval.get("dtype") or "float32")


def eval_seed(cfg: DictConfig) -> int:
    """The evaluation noise's seed: `eval.seed` (by default the run's `seed`), or `seed` in configs without it."""
    seed = cfg.eval.get("seed")
    return cfg.seed if seed is None else seed


def metric_of(cfg: DictConfig) -> dict[str, Any]:
    """The `metric` block of results.json: the settings under which scores are comparable."""
    ev = cfg.eval
    return {"features": ev.features, "n_samples": ev.n_samples, "steps": cfg.model.num_inference_steps,
            "seed": eval_seed(cfg), "dtype": dtype_name(eval_dtype(cfg))}  # fmt: skip


def calibration_noise_overlap(cfg: DictConfig) -> str | None:
    """A warning when the evaluation noise repeats the calibration trajectories' (`eval.seed` = `calib.seed`):
    `make_noise` draws a prefix-stable sequence, so the first `n_traj` evaluation samples then start from the very
    noise whose trajectories' `x_t` the student was fitted on, which flatters it. None otherwise."""
    calib, n_samples = cfg.get("calib"), OmegaConf.select(cfg, "eval.n_samples")
    if calib is None or n_samples is None or calib.get("seed") is None or eval_seed(cfg) != calib.seed:
        return None
    n_traj = resolve_n_traj(calib.n_calib, cfg.model.num_inference_steps, calib.get("n_traj"))
    return (
        f"eval.seed={eval_seed(cfg)} equals calib.seed={calib.seed}: the first {min(n_traj, n_samples)} of the "
        f"{n_samples} evaluation samples start from the noise of the calibration trajectories the student was fitted "
        "on, which flatters it; pass another eval.seed (the defaults score seed 0's noise against calib.seed 1)"
    )


def to_sampling_dtype(dtype: torch.dtype, *models: nn.Module | None) -> None:
    """Cast `models` (None skipped) to `dtype` in place where they are not in it already; a quantized student's latent
    weights snap onto their grid (`QuantLayerMixin._apply`)."""
    diffusers_log = logging.getLogger("diffusers.models.modeling_utils")
    diffusers_log.addFilter(_no_empty_fp32_advice)
    try:
        for model in models:
            if model is not None and next(model.parameters()).dtype != dtype:
                model.to(dtype)
    finally:
        diffusers_log.removeFilter(_no_empty_fp32_advice)


def _no_empty_fp32_advice(record: logging.LogRecord) -> bool:
    """Drop diffusers' advice to keep modules in float32 that names none: its `to` gives it on any cast."""
    return "that should be kept in float32: []." not in record.getMessage()


def dtype_name(dtype: torch.dtype) -> str:
    """`float16` for `torch.float16`: the spelling of `eval.dtype`."""
    return str(dtype).removeprefix("torch.")


def sample_timed(
    model: nn.Module, scheduler: Any, noise: torch.Tensor, cfg: DictConfig, desc: str
) -> tuple[torch.Tensor | None, float]:
    """DDIM samples of `model` from `noise`, sampled in the model's dtype and returned in float32, and the wall time
    it took (seconds).

    Under trainer=ddp every process samples its run of whole batches (`batch_share`) and the first process gathers
    all the samples in order (the others get None); the time runs from every process's start to the first's holding
    them all."""
    part = noise[batch_share(len(noise), cfg.eval.batch_size)]
    device = next(model.parameters()).device
    if world()[1] > 1:
        log.info(f"{desc}: process {world()[0]} samples {len(part)} of {len(noise)}")
    barrier()
    start = time.perf_counter()
    samples = part.float()  # an empty share (fewer batches than processes)
    if len(part):
        samples = ddim_sample(
            model, scheduler, part.to(next(model.parameters()).dtype), cfg.model.num_inference_steps,
            cfg.eval.batch_size, progress=cfg.eval.progress, desc=desc,
        ).float()  # fmt: skip
    samples = gather_in_order(samples, device)
    return samples, time.perf_counter() - start


def teacher_samples(
    cfg: DictConfig, teacher: nn.Module, scheduler: Any, noise: torch.Tensor
) -> tuple[torch.Tensor | None, float | None]:
    """Teacher samples from `noise`, cached on disk: every student of a sweep is compared with the same ones.

    The key covers the teacher's weights, the noise (seed, N, shape), the sampler, its step count and the device.
    A corrupt cache file is reported and rebuilt. Returns `(samples, seconds)`; `seconds` is None for cached samples:
    a time measured in another run (other threads, other load) must not be compared with this run's (`teacher_time`).
    Under trainer=ddp the first process reads and writes the cache, and the others get `(None, seconds)`.
    """
    caching, first = cfg.eval.get("cache_teacher_samples", True), world()[0] == 0
    path, fields = _teacher_cache(cfg, teacher, scheduler, noise) if caching and first else (None, {})
    cached = None
    if path is not None and path.is_file():
        try:
            with safe_open(str(path), "pt") as f:
                cached = f.get_tensor("samples")
            if cached.shape != noise.shape or not torch.isfinite(cached).all():
                raise ValueError(f"shape {tuple(cached.shape)} or values do not match")
        except Exception as e:
            cached = None
            warnings.warn(f"Teacher-sample cache '{path}' is unusable ({e}); sampling again.", stacklevel=2)
    if first_decides(cached is not None):
        return cached, None
    samples, sample_s = sample_timed(teacher, scheduler, noise, cfg, "teacher")
    if bad := first_decides(non_finite_count(samples) if first else 0):  # never cached; nothing to compare with
        dtype = next(teacher.parameters()).dtype
        raise NonFiniteSamplesError(
            f"the teacher (model.path={cfg.model.path}) sampled {bad} of {len(noise)} images with NaN or infinite "
            f"values in {dtype_name(dtype)}: it cannot be scored or compared with. "
            + (
                "Sample in float32 (eval.dtype=float32), where its activations do not overflow."
                if dtype in HALF_DTYPES
                else "Check that model.path holds a trained model (dq-eval quantizer=fp scores it alone)."
            )
        )
    if path is not None:
        meta = {"fields": json.dumps(fields, default=str)}
        write_cache(
            path, lambda tmp: save_file({"samples": samples.contiguous()}, tmp, metadata=meta), "teacher-sample cache"
        )
    return samples, sample_s


def _teacher_cache(
    cfg: DictConfig, teacher: nn.Module, scheduler: Any, noise: torch.Tensor
) -> tuple[Path, dict[str, Any]]:
    """Where the teacher's samples from `noise` are cached (`teacher_samples`), and the fields of its key."""
    fields = {
        "teacher": teacher_fingerprint(teacher), "scheduler": dict(scheduler.config), "seed": eval_seed(cfg),
        "n": len(noise), "shape": list(noise.shape[1:]), "steps": cfg.model.num_inference_steps, "version": 1,
        "device": next(teacher.parameters()).device.type,  # another device's samples differ in the last bits
    }  # fmt: skip
    # the fingerprint covers the teacher's dtype (eval.dtype): a float16 teacher's samples have their own key
    key = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return Path(cfg.eval.cache_dir) / "teacher_samples" / f"{key}.safetensors", fields


def teacher_time(cfg: DictConfig, teacher: nn.Module, scheduler: Any, noise: torch.Tensor) -> float:
    """The teacher's sampling time for all of `noise`, estimated now from its first batch (linear in N)."""
    batch = noise[: cfg.eval.batch_size * world()[1]]  # trainer=ddp: one batch in each process, as they sample
    _, seconds = sample_timed(teacher, scheduler, batch, cfg, "teacher timing")
    # scaled to this process's share of all of `noise` (the first process's is the largest: what the wall time waits on)
    share, timed = (batch_share(n, cfg.eval.batch_size) for n in (len(noise), len(batch)))
    return seconds * (share.stop - share.start) / max(timed.stop - timed.start, 1)


def build_metrics(cfg: DictConfig) -> SampleMetrics:
    """FID/IS metrics with reference statistics loaded from (or written to) the cache."""
    ev = cfg.eval
    metrics = SampleMetrics(ev.features, ev.classifier_path, ev.inception_weights_path, ev.is_splits, cfg.device)
    data = cfg.model.data
    metrics.load_or_set_reference(ev.cache_dir, reference_name(data), lambda: reference_images(data))
    return metrics


def _first_builds_metrics(cfg: DictConfig) -> SampleMetrics | None:
    """`build_metrics` in the first process (None in the others). An error in it (a damaged classifier) is raised in
    every process: the others would otherwise wait for the first in their next collective."""
    metrics, error = None, None
    if world()[0] == 0:
        try:
            metrics = build_metrics(cfg)
        except UserError as e:
            error = e
    if first_decides(error is not None):
        raise error or UserError("the first process could not build the FID/IS metrics: it reports why")
    return metrics


def evaluate_models(
    cfg: DictConfig,
    teacher: nn.Module,
    scheduler: Any,
    student: nn.Module | None,
    run_dir: Path,
    loggers: list[Logger],
    method: dict[str, Any],
    cost: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Score the teacher (and the student, from the same noise), write `results.json` + grid, log, print a table.

    Both models sample in `eval.dtype`: with float16 / bfloat16 they are cast to it in place (a quantized student's
    latent weights snapped onto their grid, `QuantLayerMixin._apply`); scores are computed in float32.
    With `eval=none` (features `none`) nothing is sampled: results.json holds the method and the cost only.
    Under trainer=ddp every process samples its share of the noise (`sample_timed`); the first scores, writes and logs
    alone, and the others return {}."""
    ev, first = cfg.eval, world()[0] == 0
    if ev.features == "none":
        return record_without_scores(run_dir, loggers, method, cost, cfg.device) if first else {}
    dtype = eval_dtype(cfg)
    to_sampling_dtype(dtype, teacher, student)
    seed = eval_seed(cfg)
    noise = make_noise(ev.n_samples, tuple(cfg.model.sample_shape), seed)
    metrics = _first_builds_metrics(cfg)
    results: dict[str, Any] = {}
    metric = metric_of(cfg)

    try:
        t_samples, t_s = teacher_samples(cfg, teacher, scheduler, noise)
    except NonFiniteSamplesError as e:  # keep the run's record (a dq-train run's cost) and say where its student is
        if not first:
            raise
        run_dir.mkdir(parents=True, exist_ok=True)
        record = {"metric": metric, "method": method, "cost": cost or {}, "provenance": provenance(cfg.device)}
        atomic_write_text(run_dir / "results.json", json.dumps(record, indent=2))
        raise NonFiniteSamplesError(f"{e} {run_dir / 'results.json'} keeps the run's record{_kept(run_dir)}.") from None
    if t_s is None:  # cached samples: time the teacher in this run, so the student's time ratio is like for like
        t_s = teacher_time(cfg, teacher, scheduler, noise)
    s_samples, s_s = sample_timed(student, scheduler, noise, cfg, "student") if student is not None else (None, 0.0)
    if not first:
        return {}
    results["teacher"] = {**metrics.score(t_samples, seed), "sample_s": t_s, "images_per_s": len(noise) / t_s}
    grid = grid_array(t_samples[: ev.grid_n])
    bad = 0
    if student is not None:
        timing = {"sample_s": s_s, "images_per_s": len(noise) / s_s, "sample_time_ratio": s_s / t_s}
        if bad := non_finite_count(s_samples):  # no scores; the timing and the teacher's scores are still recorded
            results["student"] = {"non_finite_samples": bad, **timing}
        else:
            results["student"] = {**metrics.score(s_samples, seed), "psnr_to_teacher": psnr(s_samples, t_samples),
                                  **timing}  # fmt: skip
        grid = side_by_side(grid, grid_array(s_samples[: ev.grid_n].nan_to_num(0.0)))  # NaN grey, inf white / black
    results["metric"] = metric
    results["method"] = method
    results["cost"] = cost or {}
    results["provenance"] = provenance(cfg.device)

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2))
    save_png(grid, run_dir / "samples.png")
    log_results(loggers, results, grid)
    log.info("\n" + format_table(results))  # on its own lines in the log file too
    log.info(f"results: {run_dir / 'results.json'}\nsamples: {run_dir / 'samples.png'}")
    if bad:
        if dtype in HALF_DTYPES:
            advice = "Its activations can overflow in half precision: sample in float32 (eval.dtype=float32)."
        elif (cost or {}).get("steps"):
            advice = "Its ranges or weights diverged in training: train it again with lower distill learning rates."
        else:
            advice = "Its quantization ranges or weights overflow: calibrate it again (another calib.seed)."
        raise NonFiniteSamplesError(
            f"the student sampled {bad} of {len(noise)} images with NaN or infinite values in "
            f"{dtype_name(dtype)}, so it has no FID, IS or PSNR; {run_dir / 'results.json'} keeps "
            f"the teacher's scores and the sampling times{_kept(run_dir)}. {advice}"
        )
    return results


def _kept(run_dir: Path) -> str:
    """`; the student is kept in <run>/student` where a dq-train run saved one, else ""."""
    return f"; the student is kept in {run_dir / 'student'}" if (run_dir / "student").is_dir() else ""


def record_without_scores(
    run_dir: Path, loggers: list[Logger], method: dict[str, Any], cost: dict[str, Any] | None, device: str = "cpu"
) -> dict[str, Any]:
    """`eval=none`: write results.json with the method, the cost and the provenance, and close the loggers."""
    results = {"metric": {"features": "none"}, "method": method, "cost": cost or {}, "provenance": provenance(device)}
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2))
    log_results(loggers, results, None)
    log.info(f"eval=none: nothing sampled. results: {run_dir / 'results.json'}; score the student with dq-eval "
          f"student_dir={run_dir / 'student'} and this run's model settings (model=, model.path=, model.sample_shape=, "
          "model.num_inference_steps=)")  # fmt: skip
    return results


def log_results(loggers: list[Logger], results: dict[str, Any], grid: Any | None) -> None:
    """Log the scores (and the teacher | student grid, to W&B) to every logger, then close it."""
    flat = {
        f"eval/{who}/{k}": v for who in ("teacher", "student") for k, v in results.get(who, {}).items()
    }  # e.g. eval/student/fid
    cost = results.get("cost") or {}  # training time and memory beside the scores, so runs sort by either
    flat |= {f"cost/{k}": v for k, v in cost.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if isinstance(cost.get("reverted_blocks"), list):
        flat["cost/reverted_blocks"] = len(cost["reverted_blocks"])
    step = int(cost.get("steps") or 0)  # after the last training step, not before the first
    caption = "teacher | student" if "student" in results else "teacher"
    for logger in loggers:
        logger.log_metrics(flat, step=step)
        if grid is not None and isinstance(logger, WandbLogger):
            logger.log_image(key="eval/samples", images=[grid], caption=[caption], step=step)
        logger.save()
        logger.finalize("success")


def format_table(results: dict[str, Any]) -> str:
    """A small fixed-width table of the metrics of teacher and student."""
    label = "classifier" if results["metric"]["features"] == "classifier" else "Inception"
    cols = [(f"{label}-FID", "fid", "{:.2f}"), (f"{label}-IS", "is", "{:.2f}"),
            ("PSNR-to-teacher dB", "psnr_to_teacher", "{:.2f}"), ("sample s", "sample_s", "{:.1f}")]  # fmt: skip
    head = f"{'':8}" + "".join(f"{c[0]:>20}" for c in cols)
    rows = [head]
    for who in ("teacher", "student"):
        if who in results:
            r = results[who]
            rows.append(f"{who:8}" + "".join(f"{(f.format(r[k]) if k in r else '-'):>20}" for _, k, f in cols))
            if "non_finite_samples" in r:
                rows.append(f"({who}: {r['non_finite_samples']} samples NaN or infinite, not scored)")
    m = results["metric"]
    rows.append(f"({m['n_samples']} samples, DDIM-{m['steps']}, seed {m['seed']})")
    return "\n".join(rows)


def method_of(cfg: DictConfig) -> dict[str, Any]:
    """The `method` block of results.json from the composed config."""
    callbacks = list(cfg.get("callbacks") or {})
    distill = cfg.get("distill")
    return {
        "quantizer": cfg.quantizer.name,
        "bits": cfg.bits.name if cfg.quantizer.name != "fp" else "fp",
        "distill": distill.name if distill is not None else "none",
        "callbacks": callbacks,
        "config": OmegaConf.to_container(cfg.quantizer, resolve=True),
    }
