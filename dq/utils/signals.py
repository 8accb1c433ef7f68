"""The exit status of a training stopped by a job scheduler's SIGTERM (Slurm, Kubernetes, `kill`)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

import pytorch_lightning as pl


@contextmanager
def sigterm_exits_143(trainer: pl.Trainer) -> Iterator[None]:
    """Around `trainer.fit`: Lightning ends the process after SIGTERM with `SystemExit()`, status 0, which a
    scheduler takes for success; exit with the shell's status for a process ended by TERM (128 + 15) instead."""
    try:
        yield
    except SystemExit as e:
        if trainer.received_sigterm and not e.code:
            raise SystemExit(128 + signal.SIGTERM) from None
        raise
