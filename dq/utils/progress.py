"""Progress bars and log lines on one terminal: bars on stderr (stdout keeps whole lines, for `| tee` or a file), and
log messages written through `tqdm.write`, so a message printed while a bar runs gets a line of its own."""

from __future__ import annotations

import contextlib
import logging
import sys

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm
from tqdm.auto import tqdm

INTEGER_METRIC = "distill/block"  # what BKD logs to the bar as a float (`self.log` takes no int)


class ConsoleHandler(logging.StreamHandler):
    """`logging.StreamHandler` that clears the running progress bars, writes the line and redraws them
    (conf/hydra/job_logging/dq.yaml)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


class StderrProgressBar(TQDMProgressBar):
    """Lightning's bars on stderr, beside dq's other bars (Lightning writes them to stdout). Lightning passes
    `file=sys.stdout`, read when a bar is made: each bar is made with stdout pointing at stderr.

    Args:
        description: The training bar's label in place of Lightning's `Epoch <n>` (dq-train's one epoch is all of
            distillation); None keeps Lightning's.
    """

    def __init__(self, description: str | None = None) -> None:
        super().__init__()
        self.description = description

    def init_sanity_tqdm(self) -> Tqdm:
        with contextlib.redirect_stdout(sys.stderr):
            return super().init_sanity_tqdm()

    def init_train_tqdm(self) -> Tqdm:
        with contextlib.redirect_stdout(sys.stderr):
            bar = super().init_train_tqdm()
        if (label := self.description) is not None:  # every epoch Lightning sets `Epoch <n>`: this bar keeps its label
            set_description = bar.set_description
            bar.set_description = lambda desc=None, refresh=True: set_description(label, refresh)
            bar.set_description(refresh=False)
        return bar

    def init_validation_tqdm(self) -> Tqdm:
        with contextlib.redirect_stdout(sys.stderr):
            return super().init_validation_tqdm()

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, int | str | float | dict]:
        """Lightning's bar metrics, with the block index BKD logs as a whole number (it showed `block=3.000`)."""
        metrics = super().get_metrics(trainer, pl_module)
        if isinstance(block := metrics.get(INTEGER_METRIC), float):
            metrics[INTEGER_METRIC] = int(block)
        return metrics


def progress_bar(enabled: bool, description: str | None = None) -> list[TQDMProgressBar]:
    """The callbacks to pass a `pl.Trainer` built with `enable_progress_bar=enabled` (`description`: the training
    bar's label, `StderrProgressBar`)."""
    return [StderrProgressBar(description)] if enabled else []
