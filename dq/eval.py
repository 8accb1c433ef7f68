"""`dq-eval`: sample a model and score it with FID / IS (and PSNR to the teacher for a quantized student).

The student is built from the config (`quantizer=ptq_minmax bits=w4a8`: quantized and calibrated here), or loaded
from a dq-train run (`student_dir=<run>/student`, as saved by `save_quantized`) and scored again, e.g. on more samples.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig

from dq.config import (
    EVAL_KEPT_RECORD,
    build_loggers,
    cli_errors,
    keep_hydra_record,
    log_config,
    register_resolvers,
    restoring_hydra_record,
)
from dq.distill.calibration import teacher_fingerprint
from dq.distill.parallel import (
    broadcast_from_first,
    ddp_child,
    join_parent,
    launch,
    leaving_process_group,
    wait_for_parent,
)
from dq.errors import ConfigError, MissingFileError, UserError
from dq.evaluation import calibration_noise_overlap, evaluate_models, method_of, metric_of
from dq.models import check_inference_steps, check_sample_shape, check_unconditional, load_teacher
from dq.paths import conf_dir, run_dir_lock
from dq.quant import load_quantized
from dq.quant.io import SPEC_NAME
from dq.quant.model import TIMESTEPS_BUFFER, has_per_step_ranges
from dq.student import build_student, check_layers, check_spec, sampler_timesteps
from dq.utils.io import changed_keys, read_json_object
from dq.utils.loggers import ending_wandb_run
from dq.utils.provenance import code_at_start
from dq.validation import validate

log = logging.getLogger("dq.eval")  # not __name__, which is __main__ under python -m

register_resolvers()


@ending_wandb_run()  # a multirun's next job (same process) must not log into this job's W&B run
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Load the teacher and the student (built from the config, none for `quantizer=fp`, or a saved one from
    `student_dir`), evaluate both from one noise."""
    code_at_start()  # results.json's provenance names the code as the run starts, whatever is committed later
    if child := ddp_child():  # trainer=ddp: a process the first one started; what it would print, the first prints
        join_parent(cfg)
    validate(cfg)
    if cfg.eval.features == "none":
        raise ConfigError("eval=none scores nothing: dq-eval needs eval=fid_is (the default) or eval=inception.")
    run_dir = Path(cfg.run_dir)
    if (run_dir / "student").exists() or (run_dir / "checkpoints").exists():
        raise ConfigError(
            f"run_dir={run_dir} holds a dq-train run: dq-eval would overwrite its results.json and samples.png. "
            f"Evaluate into a new directory (hydra.run.dir=...); to score that run's student again, pass "
            f"student_dir={run_dir / 'student'}."
        )
    student_dir = Path(cfg.student_dir) if cfg.get("student_dir") else None
    if student_dir is not None and cfg.quantizer.name != "fp":
        raise ConfigError(
            f"student_dir={student_dir} scores a saved student, and quantizer={cfg.quantizer.name} would build "
            "another: pass one of the two."
        )
    if student_dir is None and cfg.quantizer.name != "fp":
        check_spec(cfg)
        if cfg.quantizer.get("spec", {}).get("learnable"):  # dq-eval would score it untrained, without WD / TPQ
            raise ConfigError(
                f"quantizer={cfg.quantizer.name} is a trained method (quantizer.spec.learnable=true): train it with "
                f"dq-train quantizer={cfg.quantizer.name} (or its experiment=...), then score the run with dq-eval "
                "student_dir=<run>/student. dq-eval builds post-training students only (quantizer=ptq_minmax), or this "
                "spec untrained with quantizer.spec.learnable=false."
            )
    if not child:  # before anything in the run directory changes
        check_same_evaluation(run_dir, saved_method(student_dir) if student_dir else method_of(cfg), metric_of(cfg))
    pl.seed_everything(cfg.seed, verbose=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    if child:  # it samples its share, inside the first process's lock
        try:
            return _load_evaluate(cfg, run_dir, student_dir)
        except UserError:  # raised in every process (a teacher that samples NaN): the first reports it
            wait_for_parent()
            raise
    with run_dir_lock(run_dir):  # one writer per run directory
        return _load_evaluate(cfg, run_dir, student_dir)


def check_same_evaluation(run_dir: Path, method: dict[str, Any], metric: dict[str, Any]) -> None:
    """Refuse a run directory that holds the results of another evaluation (another student, bit-width, sample
    count, ...), before anything in it changes; the same evaluation is scored again (its CSV log appends). A saved
    student is compared by its folder alone, resolved (its run's results.json may have changed since), and settings
    an older results.json lacks are not compared."""
    old = read_json_object(run_dir / "results.json")
    if not old:
        return
    before = {"method": _evaluated(old.get("method")), "metric": old.get("metric")}
    changed = changed_keys(before, {"method": _evaluated(method), "metric": metric})
    if changed := [key for key in changed if _holds(before, key.split("."))]:
        raise ConfigError(
            f"run_dir={run_dir} holds the results of another evaluation ({', '.join(changed[:6])}"
            f"{', ...' if len(changed) > 6 else ''} differ); nothing was changed. Pass another hydra.run.dir=... (by "
            "default each dq-eval command makes a new one)."
        )


def _evaluated(method: Any) -> Any:
    """What identifies the evaluated student in results.json's `method`: a saved student's resolved folder, or the
    method itself."""
    if isinstance(method, dict) and method.get("student_dir"):
        return {"student_dir": str(Path(method["student_dir"]).expanduser().resolve())}
    return method


def _holds(record: Any, keys: list[str]) -> bool:
    """Whether the nested dict `record` has the dotted key `keys`."""
    for key in keys:
        if not isinstance(record, dict) or key not in record:
            return False
        record = record[key]
    return True


def _load_evaluate(cfg: DictConfig, run_dir: Path, student_dir: Path | None) -> dict[str, Any]:
    """`evaluate` inside the run-directory lock. Under trainer=ddp the first process starts the others once the
    student is built; they build its structure without calibrating (or load it), take the first's student, and every
    process samples its share."""
    teacher, scheduler = load_teacher(cfg.model.path)
    check_unconditional(teacher)
    check_sample_shape(teacher, cfg.model.sample_shape)
    check_inference_steps(scheduler, cfg.model.num_inference_steps)
    teacher_digest = teacher_fingerprint(teacher) if student_dir is not None else None  # on the CPU, as saved
    teacher.to(cfg.device)
    saved = None if student_dir is None else load_student(student_dir, teacher, cfg.device, teacher_digest)
    if saved is not None:
        check_steps(saved, student_dir, sampler_timesteps(scheduler, cfg.model.num_inference_steps))
    elif cfg.quantizer.name != "fp":
        check_layers(cfg, teacher)
    loggers = build_loggers(cfg.logger)  # before calibration: an unwritable log directory costs nothing yet
    if not ddp_child():  # every check passed: this command's record is the run's, put back after a refused one
        keep_hydra_record(EVAL_KEPT_RECORD)
        log_config(loggers, cfg)
    log.info(f"run directory: {run_dir}")  # past the checks that refuse a command (its directory is then removed)
    if saved is None:
        if cfg.quantizer.name != "fp" and (overlap := calibration_noise_overlap(cfg)):
            log.warning(overlap)  # a PTQ student calibrates on teacher trajectories from calib.seed's noise
        # under trainer=ddp only the first process calibrates: the others take its ranges (`broadcast_from_first`)
        student, cost = build_student(cfg, teacher, scheduler, calibrate=not ddp_child())
        method = method_of(cfg)
    else:
        student, cost, method = saved, {}, saved_method(student_dir)
        log.info(f"student: {student_dir} ({method.get('quantizer')} {method.get('bits')}, as saved)")
    fabric = launch(cfg)
    if fabric is None:
        return evaluate_models(cfg, teacher, scheduler, student, run_dir, loggers, method, cost)
    with leaving_process_group(fabric.strategy):
        if student is not None:  # each process built or loaded it: sample the first's everywhere
            broadcast_from_first(student)
            if fabric.global_rank:
                log.info(f"student: process {fabric.global_rank} takes the first process's student")
        cost = {**cost, "processes": fabric.world_size}
        return evaluate_models(cfg, teacher, scheduler, student, run_dir, loggers, method, cost)


def load_student(student_dir: Path, teacher: Any, device: str, teacher_digest: str | None = None) -> Any:
    """The student saved in `student_dir`, checked to take the teacher's inputs and, where both are known, to come
    from this teacher (`teacher_digest`: its `teacher_fingerprint` on the CPU)."""
    if not student_dir.is_dir():
        raise MissingFileError(f"student_dir={student_dir} does not exist: pass the student/ folder of a dq-train run.")
    if not (student_dir / SPEC_NAME).is_file():
        raise MissingFileError(
            f"student_dir={student_dir} holds no saved student ({SPEC_NAME} missing): pass the student/ folder of a "
            "dq-train run."
        )
    saved_teacher = read_json_object(student_dir / SPEC_NAME).get("teacher")  # students saved before: no record
    if None not in (saved_teacher, teacher_digest) and saved_teacher != teacher_digest:
        raise ConfigError(
            f"student_dir={student_dir} was quantized from another teacher than model.path: its {SPEC_NAME} records "
            "a teacher whose weights differ (a retrained or other model), so PSNR to the teacher and the FID ratio "
            "would compare it with a model it never learned from. Pass the model.path of the run that trained it."
        )
    student = load_quantized(student_dir, device=device)
    keys = ("in_channels", "out_channels", "sample_size")
    if any(student.config.get(k) != teacher.config.get(k) for k in keys):
        raise ConfigError(
            f"student_dir={student_dir} was quantized from another model than model.path: "
            + ", ".join(f"{k} {student.config.get(k)} vs {teacher.config.get(k)}" for k in keys)
        )
    return student.eval().requires_grad_(False)


def check_steps(student: Any, student_dir: Path, timesteps: Any) -> None:
    """A saved student's per-step quantizers hold one range per sampling step of its run: sample with those steps (a
    student with shared ranges samples with any schedule)."""
    table = getattr(student, TIMESTEPS_BUFFER, None)
    if table is None or not has_per_step_ranges(student):
        return
    if len(table) != len(timesteps):
        raise ConfigError(
            f"student_dir={student_dir} was calibrated for {len(table)} sampling steps and model.num_inference_steps"
            f" gives {len(timesteps)} other ones: pass model.num_inference_steps={len(table)}."
        )
    if not bool((table.cpu() == timesteps.cpu()).all()):
        raise ConfigError(
            f"student_dir={student_dir} was calibrated for the timesteps {table.tolist()}, and the scheduler of "
            f"model.path gives {timesteps.tolist()} at the same number of steps: its scheduler_config.json differs "
            "(timestep_spacing, steps_offset) from the one the student was trained with. Use that model's scheduler."
        )


def saved_method(student_dir: Path) -> dict[str, Any]:
    """results.json's `method` of the run that saved `student_dir` (its own results.json beside it), plus where the
    student came from; only `student_dir` when that file is missing or unreadable."""
    method = read_json_object(student_dir.parent / "results.json").get("method")
    if not isinstance(method, dict):
        method = {"quantizer": "saved", "bits": "?"}
    return {**method, "student_dir": str(student_dir)}


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="eval")
def main(cfg: DictConfig) -> None:
    with cli_errors("dq-eval"), restoring_hydra_record():
        evaluate(cfg)


if __name__ == "__main__":  # python -m dq.eval
    # run from the importable dq.eval: a Hydra launcher that pickles the task function (submitit) pickles it by
    # value, and its globals then resolve to dq.eval by reference; as __main__'s they would be pickled (and fail)
    from dq.eval import main as importable_main

    sys.exit(importable_main())
