"""Hydra/OmegaConf glue: custom resolvers, one-line command-line errors, the run's Hydra record and loggers
(start-up validation: `dq.validation`)."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import signal
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
from filelock import FileLock, Timeout
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger

from dq.errors import ConfigError, UserError
from dq.paths import LOCK_NAME, PACKAGE_DIR, asset, cache_dir, conf_dir
from dq.utils.io import atomic_write


class _DropAdverts(logging.Filter):
    """Lightning's tip to install its cloud logger, printed by every Trainer: not dq's business, and it hides the
    lines that are."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_DropAdverts())


class LogFileOnly(logging.Filter):
    """Lightning's lines that say nothing a dq user acts on: the TPU / HPU it did not find, and why `trainer.fit`
    stopped (dq sets the steps; a finished run that resumes has none left). conf/hydra/job_logging/dq.yaml keeps them
    off the terminal and in the run's log file."""

    PREFIXES = ("TPU available:", "HPU available:", "`Trainer.fit` stopped:")

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("pytorch_lightning") and record.getMessage().startswith(self.PREFIXES))


class BelowWarning(logging.Filter):
    """Passes debug and info records only: conf/hydra/job_logging/dq.yaml sends them to stdout, the rest to stderr."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


class ToolWarnings(logging.Formatter):
    """The terminal's format of dq's own logged warnings: `<tool>: warning: <message>`, one line like its Python
    warnings (`one_line_warnings`) and errors; other records (Lightning's, an error already prefixed) as they are."""

    def __init__(self, prog: str) -> None:
        super().__init__("%(message)s")
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ours = record.name == "dq" or record.name.startswith("dq.")
        if record.levelno == logging.WARNING and ours and not line.startswith(f"{self.prog}: "):
            return f"{self.prog}: warning: {line}"
        return line


def wandb_offline() -> bool:
    """W&B runs offline unless an API key is configured (or WANDB_MODE=online is set explicitly)."""
    if os.environ.get("WANDB_MODE") == "online":
        return False
    return not os.environ.get("WANDB_API_KEY")


def student_name(quantizer: str, bits: str, student_dir: str | None) -> str:
    """What dq-eval scores, for its run directory's name: `<quantizer>-<bits>` for a student it builds (`fp-...`
    for the teacher alone), `saved-<run>` for a saved one, `<run>` being the folder of the dq-train run that saved
    it (its time stamp, or a multirun job's `<n>-<quantizer>-<bits>-<distill>`)."""
    if not student_dir:
        return f"{quantizer}-{bits}"
    folder = Path(student_dir)
    folder = folder.parent if folder.name == "student" else folder
    return f"saved-{folder.name or 'student'}"


def config_groups(config_name: str) -> str:
    """`group: option, option, ...` for each config group in the defaults list of `conf/<config_name>.yaml`, one line
    each, sorted: what `--help` lists for that app (Hydra's `$APP_CONFIG_GROUPS` lists every group in conf/, the other
    apps' included)."""
    root = Path(conf_dir())
    defaults = OmegaConf.load(root / f"{config_name}.yaml").get("defaults", [])
    groups = sorted(str(k) for d in defaults if isinstance(d, dict | DictConfig) for k in d
                    if not str(k).startswith("override ") and "/" not in str(k))  # fmt: skip
    return "\n".join(f"{g}: {', '.join(sorted(f.stem for f in (root / g).glob('*.yaml')))}" for g in groups)


def register_resolvers() -> None:
    """`${dq.asset:name}`, `${dq.cache:}`, `${dq.wandb_offline:}`, `${dq.student_name:q,b,dir}` and
    `${dq.config_groups:name}` for the yaml files (idempotent)."""
    for name, fn in {
        "dq.asset": asset,
        "dq.cache": lambda: str(cache_dir()),
        "dq.wandb_offline": wandb_offline,
        "dq.student_name": student_name,
        "dq.config_groups": config_groups,
    }.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def one_line_warnings(prog: str, default: Any, end: str = "\n") -> Any:
    """A `warnings.formatwarning` that gives dq's own warnings (a setting to reconsider, a cache skipped) one line,
    `<prog>: warning: <message>`, as its errors, and other packages' warnings the format of `default` (the
    `formatwarning` it replaces: file, line and source); each ends in `end` ("" where logging, which adds its own,
    prints them)."""

    def format_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                       line: str | None = None) -> str:  # fmt: skip
        if Path(filename).resolve().is_relative_to(PACKAGE_DIR):
            return f"{prog}: warning: {message}{end}"
        return default(message, category, filename, lineno, line).rstrip("\n") + end

    return format_warning


@contextmanager
def cli_errors(prog: str) -> Iterator[None]:
    """Turn a `UserError` (`ConfigError`, `MissingFileError`, `CheckpointError`) into one line on stderr,
    `<prog>: error: <message>`, and exit status 2 (a multirun's job fails alone); other exceptions keep their
    traceback. dq's own warnings are one line too (`one_line_warnings`). In a Hydra app the line, any other traceback
    and Python's warnings also go to the run's log file (conf/hydra/job_logging/dq.yaml)."""
    in_hydra = HydraConfig.initialized()
    new_run_dir = in_hydra and HydraConfig.get().mode == RunMode.RUN and run_dir_is_new()
    formatwarning = warnings.formatwarning
    warnings.formatwarning = one_line_warnings(prog, formatwarning, end="" if in_hydra else "\n")
    if in_hydra:
        logging.captureWarnings(True)
        log_command(prog)
    try:
        yield
    except UserError as e:
        if not in_hydra:
            print(f"{prog}: error: {e}", file=sys.stderr)
            sys.exit(2)
        logging.getLogger(prog).error(f"{prog}: error: {e}")  # to stderr and the job's log file
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra fails this job only and runs the sweep's others; its log keeps the line
        if new_run_dir:
            drop_refused_run_dir()
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C outside a fit (Lightning handles its own): one line, not a traceback
        if in_hydra:
            run = HydraConfig.get().runtime.output_dir
            go_on = {
                "dq-train": f"re-run the same command with hydra.run.dir={run}: it resumes from the last finished "
                "block, or scores the saved student",
                "dq-eval": "nothing is scored until an evaluation finishes: re-run the command",
            }.get(prog, "re-run the command")
            logging.getLogger(prog).error(f"{prog}: interrupted (Ctrl-C): {go_on}.")
        else:
            print(f"{prog}: interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except Exception as e:
        if in_hydra and _submitit_gave_up(e):  # raised in the job by submitit's signal handler: not a crash
            hint = "raise hydra.launcher.timeout_min or hydra.launcher.max_num_timeout"
            if prog == "dq-train":
                checkpoints = Path(HydraConfig.get().runtime.output_dir) / "checkpoints"
                hint += (
                    f"; distill=bkd resumes from the finished blocks in {checkpoints} when the same sweep runs again "
                    "(the same command and hydra.sweep.dir)"
                )
            logging.getLogger(prog).error(
                f"{prog}: error: submitit stopped the job: {e} It reached its time limit or was preempted, and "
                f"submitit requeues it no more: {hint}."
            )
        elif in_hydra:  # Hydra prints the traceback on stderr; the run's log file keeps it too
            logging.getLogger("dq.crash").exception(f"{prog}: crashed (a bug in dq or a library, not a setting)")
        raise  # a submitit job ends on the exception: submitit records it as the job's result
    finally:
        warnings.formatwarning = formatwarning
        if in_hydra:
            logging.captureWarnings(False)


def _submitit_gave_up(error: Exception) -> bool:
    """`error` is submitit's `UncompletedJobError`: the job timed out (or was preempted) and is not requeued."""
    kind = type(error)
    return kind.__name__ == "UncompletedJobError" and kind.__module__.startswith("submitit.")


HYDRA_RECORD = ("config.yaml", "hydra.yaml", "overrides.yaml")  # what Hydra writes to <run>/.hydra


def _run_files() -> tuple[Path, Path, Path | None]:
    """This Hydra job's run directory, its log file and its Hydra record directory (None without one)."""
    hydra_cfg = HydraConfig.get()
    run = Path(hydra_cfg.runtime.output_dir).resolve()
    record = run / hydra_cfg.output_subdir if hydra_cfg.output_subdir is not None else None
    return run, run / f"{hydra_cfg.job.name}.log", record


def _holds_only_hydra_files(*extra: Path) -> bool:
    """Whether the run directory holds nothing but Hydra's record, the job's log file and `extra`."""
    run, log_file, record = _run_files()
    if not run.is_dir() or any(p not in (log_file, record, *extra) for p in run.iterdir()):
        return False
    return record is None or not record.exists() or all(p.name in HYDRA_RECORD for p in record.iterdir())


# by run directory, the directories on its path that did not exist before Hydra made them (NoteFoundRunDir): a run
# directory missing from its own set existed already
_MADE_DIRS: dict[Path, set[Path]] = {}


class NoteFoundRunDir(Callback):
    """Hydra callback (`hydra.callbacks.found_run_dir` in conf/train.yaml, eval.yaml, pretrain.yaml): before Hydra
    makes the run directory, notes which directories on its path do not exist yet, so that a refused command never
    removes a directory the user made, empty or not (`run_dir_is_new`), and removes those Hydra made and left empty
    (`drop_refused_run_dir`). A run directory Hydra could not make or write in (a file, a read-only place) is refused
    here with one line: Hydra would fail on it with a traceback."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            run = Path(str(OmegaConf.select(config, "hydra.run.dir", throw_on_resolution_failure=True)))
        except Exception:  # Hydra itself then fails on it, with its own message
            return
        if problem := _unusable_run_dir(run.absolute()):
            prog = OmegaConf.select(config, "hydra.help.app_name") or "dq"
            print(f"{prog}: error: hydra.run.dir={run} {problem}: pass another hydra.run.dir=...", file=sys.stderr)
            sys.exit(2)  # Hydra turns a callback's exception into a warning and goes on
        # Hydra's mkdir(parents=True) makes every missing directory along the path as written: `outputs/train/..`
        # makes outputs/train too, so the path's own components are noted, each where it lands
        made = {r for p in (run.absolute(), *run.absolute().parents) if not (r := p.resolve()).exists()}
        _MADE_DIRS[run.resolve()] = made


class CheckLauncherGpus(Callback):
    """Hydra callback (`hydra.callbacks.launcher_gpus` in conf/train.yaml, eval.yaml, pretrain.yaml): before a
    multirun submits its jobs, refuse a launcher that reserves GPUs for jobs that run on the CPU (`hydra/launcher=slurm`
    without `trainer=gpu`), which would hold each GPU idle for the job's hours. A swept trainer or device is left to
    the jobs."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        launcher = OmegaConf.select(config, "hydra.launcher") or {}
        gpus = {k: v for k in ("gpus_per_node", "gpus_per_task") if isinstance(v := launcher.get(k), int) and v > 0}
        if not gpus or OmegaConf.select(config, "trainer.accelerator") != "cpu":
            return
        overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        if any(o.is_sweep_override() and o.key_or_group.startswith(("trainer", "device")) for o in overrides):
            return
        reserved = ", ".join(f"hydra.launcher.{k}={v}" for k, v in gpus.items())
        prog = OmegaConf.select(config, "hydra.help.app_name") or "dq"
        print(  # Hydra turns a callback's exception into a warning and goes on: exit here, before any job is sent
            f"{prog}: error: {reserved} reserves GPUs for every job, and trainer.accelerator=cpu would run each job "
            "on the CPU with them idle: add trainer=gpu, or hydra.launcher.gpus_per_node=0 to run the jobs on CPUs.",
            file=sys.stderr,
        )
        sys.exit(2)


def _unusable_run_dir(run: Path) -> str | None:
    """Why Hydra could not make `run` or write its log there, or None."""
    if run.exists() and not run.is_dir():
        return "is a file, not a directory"
    existing = next(p for p in (run, *run.parents) if p.exists())
    if not existing.is_dir():
        return f"lies under {existing}, which is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot be written: {existing} is read-only for this user"
    return None


def run_dir_is_new() -> bool:
    """Whether this command's Hydra made the run directory and it holds only what Hydra wrote (its record, an empty
    log file): called before the command logs anything, it tells a directory this command made from one the user
    made (`NoteFoundRunDir`) or with an earlier attempt's log or the user's files in it."""
    run, log_file, _ = _run_files()
    if run not in _MADE_DIRS.get(run, {run}):  # it existed before (without a note: taken as made)
        return False
    return _holds_only_hydra_files() and (not log_file.exists() or log_file.stat().st_size == 0)


def drop_refused_run_dir() -> None:
    """After a refused single run in a new run directory (`run_dir_is_new`): remove it when it still holds nothing
    but Hydra's record, this command's log and a free lock (the terminal has the error), so a typo leaves no empty run
    among the real ones. Kept as it is when anything else is there, another dq process holds the lock, it is the
    working directory, or it cannot be removed whole."""
    run, log_file, record = _run_files()
    cwd = Path.cwd().resolve()
    if run in (cwd, *cwd.parents) or not _holds_only_hydra_files(run / LOCK_NAME):
        return
    for logger in (logging.getLogger(), *(logging.getLogger(n) for n in ("dq.command", "dq.crash"))):
        for handler in list(logger.handlers):  # the log file: closed before it is removed
            if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).resolve() == log_file:
                handler.close()
                logger.removeHandler(handler)
    try:
        with FileLock(run / LOCK_NAME, timeout=0):  # held: another dq process is starting in this directory
            if record is not None and record.exists():
                for f in record.iterdir():
                    f.unlink()
                record.rmdir()
            log_file.unlink(missing_ok=True)
            (run / LOCK_NAME).unlink(missing_ok=True)
        run.rmdir()  # fails, keeping it, if anything appeared meanwhile
    except (Timeout, OSError):
        return
    # the directories Hydra made on the way (outputs/eval/<model>/...; NoteFoundRunDir), deepest first
    for made in sorted(_MADE_DIRS.get(run, set()) - {run}, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            made.rmdir()  # fails, keeping it, on one with anything in it


def log_command(prog: str) -> None:
    """Write this command, as typed after the program's name (`hydra.run.dir=...` included), to the run's log file
    only (logger `dq.command`): a run directory's log then tells its attempts (a resumed run, a refused command)
    apart. A multirun job gets its own overrides."""
    hydra_cfg = HydraConfig.get()
    args = list(hydra_cfg.overrides.task) if hydra_cfg.mode == RunMode.MULTIRUN else sys.argv[1:]
    logging.getLogger("dq.command").info(shlex.join([prog, *args]))


def _hydra_record_dir() -> Path | None:
    """`<run>/.hydra`, where Hydra saved this command's config; None outside a Hydra app or without one."""
    if not HydraConfig.initialized() or HydraConfig.get().output_subdir is None:
        return None
    hydra_cfg = HydraConfig.get()
    return Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir


TRAIN_KEPT_RECORD = "checkpoints/hydra"  # dq-train: beside the checkpoints that accepted the command
EVAL_KEPT_RECORD = ".hydra/accepted"  # dq-eval: beside Hydra's record (a checkpoints/ folder marks a dq-train run)


def _copy_files(src: Path, dst: Path) -> None:
    """Copy the files directly in `src` into `dst` (created), each atomically."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            atomic_write(dst / f.name, lambda tmp, f=f: shutil.copyfile(f, tmp))


def keep_hydra_record(kept: str = TRAIN_KEPT_RECORD) -> None:
    """Copy this command's Hydra record (`<run>/.hydra`) to `<run>/<kept>`: dq-train calls it once the run
    directory's checkpoints accepted the command, dq-eval once every check accepted it, so the copy always
    describes the run."""
    record = _hydra_record_dir()
    if record is not None and record.is_dir():
        _copy_files(record, record.parent / kept)


@contextmanager
def restoring_hydra_record() -> Iterator[None]:
    """Hydra writes each command's config to `<run>/.hydra` before dq can check it: when the command fails (a refused
    resume, a run directory in use, a bad setting), put back the run's own record kept by `keep_hydra_record` (by
    dq-train or by dq-eval, whichever made the run; either app may refuse a command in it)."""
    try:
        yield
    except BaseException:
        record = _hydra_record_dir()
        kept = [record.parent / k for k in (TRAIN_KEPT_RECORD, EVAL_KEPT_RECORD)] if record is not None else []
        if found := next((k for k in kept if k.is_dir()), None):
            _copy_files(found, record)
        raise


def log_config(loggers: list[Logger], cfg: DictConfig) -> None:
    """The composed config, resolved, as every logger's hyperparameters: W&B's run config (filterable as `bits.name`,
    `distill.lr_weight`, ...) and the CSV logger's `hparams.yaml`."""
    params = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(params)


def build_loggers(logger_cfg: DictConfig | None) -> list[Logger]:
    """Instantiate every logger under the `logger` group (e.g. `csv`, `wandb`); an empty group gives none."""
    if not logger_cfg:
        return []
    os.environ.setdefault("WANDB_SILENT", "true")
    _check_log_dirs(logger_cfg)
    return [hydra.utils.instantiate(c) for c in logger_cfg.values() if c is not None]


def _check_log_dirs(logger_cfg: DictConfig | None) -> None:
    """Create each logger's `save_dir` and write a file in it now: otherwise the CSV logger fails once training
    starts, and W&B quietly writes to a temporary directory instead."""
    for name, c in (logger_cfg or {}).items():
        if c is None or c.get("save_dir") is None:
            continue
        directory = Path(str(c.save_dir))
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError as e:
            raise ConfigError(
                f"logger.{name}.save_dir={directory}: cannot write there ({e.strerror or e}); pass a writable "
                "directory, or drop the override (the run directory, by default)."
            ) from e
