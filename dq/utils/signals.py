"""The exit status of a training stopped by a signal: a job scheduler's SIGTERM (Slurm, Kubernetes, `kill`) or
Ctrl-C."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

import pytorch_lightning as pl


@contextmanager
def signal_exit_status(trainer: pl.Trainer) -> Iterator[None]:
    """Around `trainer.fit`: exit with the shell's status for a process ended by a signal, 128 + its number.
    Lightning ends the process after SIGTERM with status 0, which a scheduler takes for success (143 instead), and
    after Ctrl-C with status 1, as for an error (130 instead)."""
    try:
        yield
    except SystemExit as e:
        if trainer.received_sigterm and not e.code:
            raise SystemExit(128 + signal.SIGTERM) from None
        if trainer.interrupted and e.code == 1:  # Lightning's exit after KeyboardInterrupt
            raise SystemExit(128 + signal.SIGINT) from None
        raise
