"""`dq-eval`: sample a model and score it with FID / IS (and PSNR to the teacher for a quantized student)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig

from dq.config import build_loggers, register_resolvers, validate
from dq.evaluation import evaluate_models, method_of
from dq.models import load_teacher
from dq.paths import conf_dir, run_dir_lock
from dq.student import build_student

register_resolvers()


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Load the teacher, build the configured student (none for `quantizer=fp`), evaluate both from one noise."""
    validate(cfg)
    pl.seed_everything(cfg.seed, verbose=False)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_dir_lock(run_dir):  # one writer per run directory
        teacher, scheduler = load_teacher(cfg.model.path)
        teacher.to(cfg.device)
        student, cost = build_student(cfg, teacher, scheduler)
        loggers = build_loggers(cfg.logger)
        return evaluate_models(cfg, teacher, scheduler, student, run_dir, loggers, method_of(cfg), cost)


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    sys.exit(main())
