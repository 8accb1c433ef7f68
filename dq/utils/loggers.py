"""Loggers for runs that resume: a CSV logger that keeps the rows of an earlier attempt, a W&B logger, and the end of
a W&B run."""

from __future__ import annotations

import csv
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers import WandbLogger as LightningWandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment

from dq.utils.io import atomic_write


class ResumableCSVLogger(CSVLogger):
    """Lightning's `CSVLogger`, except that a resumed run appends to `metrics.csv` instead of deleting it.

    Lightning's writer removes an existing metrics file when it starts; this one puts the file back and carries on
    with its columns, so the loss curves of the blocks trained before an interruption stay in the run.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is not None:
            return self._experiment
        path = Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE
        aside = path.with_name(f"{path.name}.kept")  # renamed, not read into memory: a kill meanwhile loses nothing
        if path.is_file() and not aside.exists():  # (one left by such a kill is the earlier rows: it is kept)
            path.replace(aside)
        with warnings.catch_warnings():  # "Previous log files in this directory will be deleted": not here
            warnings.filterwarnings("ignore", ".*Previous log files in this directory will be deleted.*")
            writer = super().experiment
        if aside.is_file():
            aside.replace(path)
            with path.open(newline="") as f:
                writer.metrics_keys = next(csv.reader(f), [])  # the header; later rows append under it
        # a new column (each block logs its own) makes the writer rewrite the whole file under the new header: beside
        # it and renamed in, so a kill meanwhile keeps the rows written so far
        writer._rewrite_with_new_header = lambda fieldnames: _rewrite_atomically(path, fieldnames)
        return writer


def _rewrite_atomically(path: Path, fieldnames: list[str]) -> None:
    """Lightning's `_ExperimentWriter._rewrite_with_new_header`, written through `atomic_write`."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


class WandbLogger(LightningWandbLogger):
    """Lightning's `WandbLogger`, without the `anonymous=None` it hands to `wandb.init` when the setting is not
    given: wandb (0.2x and later) answers it with "The anonymous setting has no effect" on every run's terminal.

    Unless given, a run's W&B name and group come from its run directory (`save_dir`): named by the directory and
    its parent (`dilatequant-w4a8/<time>`; a sweep's job `<sweep time>/0-ptq_minmax-w4a8`), grouped by the parent
    (the method and bits of single runs, the sweep of a multirun's jobs), and typed by the app (`train`, `eval`). A
    resumed or re-scored run takes the id of the W&B run an earlier attempt started in the directory, so it goes on
    in that W&B run as its CSV log does; a new directory (or one whose `wandb/` was deleted) starts a new one."""

    def __init__(self, **kwargs: Any) -> None:
        if kwargs.get("save_dir"):
            run = Path(kwargs["save_dir"]).expanduser().resolve()
            kwargs.setdefault("name", f"{run.parent.name}/{run.name}")
            kwargs.setdefault("group", run.parent.name)
            if HydraConfig.initialized():
                kwargs.setdefault("job_type", HydraConfig.get().job.name)  # train / eval / pretrain
            if kwargs.get("id") is None and kwargs.get("version") is None and (earlier := _earlier_wandb_id(run)):
                kwargs["id"] = earlier  # Lightning passes resume="allow": the W&B run goes on
        super().__init__(**kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)

    @staticmethod
    def kwargs_target() -> Callable[..., Any]:
        """Where Lightning passes the settings it does not name: `wandb.init` (`dq.validation.accepted_settings`)."""
        import wandb  # only when the logger is configured

        return wandb.init


def _earlier_wandb_id(run: Path) -> str | None:
    """The id of the W&B run an earlier attempt started in `run`: wandb points `<run>/wandb/latest-run` at that run's
    folder, `run-<time>-<id>` (`offline-run-...` offline); None when there is none."""
    latest = run / "wandb" / "latest-run"
    if not latest.is_dir():
        return None
    found = re.fullmatch(r"(?:offline-)?run-\d{8}_\d{6}-([0-9a-z]+)", latest.resolve().name)
    return found.group(1) if found else None


@contextmanager
def ending_wandb_run() -> Iterator[None]:
    """End the W&B run a job started, also when it fails: Lightning's `finalize` leaves it open, and the next job of
    a Hydra multirun (same process) would otherwise log into it. A context manager or a decorator."""
    try:
        yield
    except BaseException:
        _finish_wandb(exit_code=1)
        raise
    _finish_wandb(exit_code=0)


def _finish_wandb(exit_code: int) -> None:
    wandb = sys.modules.get("wandb")  # never imported: no run to end
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)
