"""Benchmark: time the activation calibration of the default student (TPQ, MSE initialisation) and fingerprint it.

    python experiments/bench_calibration.py [hydra overrides, e.g. calib.n_calib=5120 trainer=gpu]

Builds the student as `dq-train` does up to training (quantize, per-step quantizers, calibration set from the cache;
no Weight Dilation), then times one `calibrate_student(..., force=True)` — the pass the TPQ callback makes at the
start of training — and prints the seconds, the process's peak host memory (teacher and calibration set included)
and the sha256 of the calibrated student's whole state (`teacher_fingerprint`), so a faster implementation can be
checked to give the same student bit for bit (`OMP_NUM_THREADS=1` for timings comparable across runs;
`device=cuda` or `trainer=gpu` on a GPU).
"""

from __future__ import annotations

import sys
import time

import torch
from hydra import compose, initialize_config_dir

from dq.config import register_resolvers
from dq.distill.base import calibrate_student
from dq.distill.calibration import teacher_fingerprint
from dq.models import load_teacher
from dq.paths import conf_dir
from dq.quant import expand_act_quantizers
from dq.student import calibration_set, quantize_student
from dq.train import peak_memory


def main(overrides: list[str]) -> None:
    register_resolvers()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose("train", overrides=["eval.progress=false", *overrides])
    device = str(cfg.device)
    teacher, scheduler = load_teacher(cfg.model.path)
    student = quantize_student(cfg, teacher.to(device), scheduler)
    expand_act_quantizers(student)
    calib = calibration_set(cfg, teacher, scheduler)
    start = time.perf_counter()
    calibrate_student(student, calib, cfg.calib.batch_size, force=True, progress=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    rss_gb = peak_memory()["peak_mem_mb"] / 1024  # the process's peak (nothing reset it)
    print(
        f"calibrate_student: {len(calib)} pairs, batch {cfg.calib.batch_size}, {device}, "
        f"{torch.get_num_threads()} thread(s): {seconds:.1f} s, peak host memory {rss_gb:.2f} GB, "
        f"student sha256 {teacher_fingerprint(student)[:16]}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
