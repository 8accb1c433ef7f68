"""Benchmark: DDIM sampling time of the teacher and of a saved quantized student, and a fingerprint of the samples.

    python experiments/bench_sampling.py STUDENT_DIR [--n 250] [--repeats 3] [hydra overrides, e.g. model.path=...]

Samples `--n` images on `device` in `eval.dtype` (as dq-train samples: the CPU and float32 by default; `device=cuda`,
`eval.dtype=bfloat16` override them) with DDIM (the model config's steps, `eval.batch_size` per batch) from the same
seeded noise (that of `eval.seed`, as dq-train's) with the teacher and with the student that `dq-train` saved
(`<run>/student`), `--repeats` times each, and prints the fastest time of each, their ratio and the sha256 of the
student's samples (as float32), so a faster quantized forward can be checked to give the same samples bit for bit
(`OMP_NUM_THREADS=1` for CPU timings comparable across runs; each time ends with the samples back on the CPU, so a
GPU's queued work is counted).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time

import torch
from hydra import compose, initialize_config_dir

from dq.config import register_resolvers
from dq.evaluation import dtype_name, eval_dtype, eval_seed, to_sampling_dtype
from dq.models import ddim_sample, load_teacher, make_noise
from dq.paths import conf_dir
from dq.quant import load_quantized


def best_time(model: torch.nn.Module, scheduler, noise: torch.Tensor, steps: int, batch: int, repeats: int):
    """`(samples, fastest seconds)` over `repeats` identical sampling runs."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        samples = ddim_sample(model, scheduler, noise, steps, batch, progress=False)
        times.append(time.perf_counter() - start)
    return samples, min(times)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("student_dir")
    parser.add_argument("--n", type=int, default=250, help="images per sampling run")
    parser.add_argument("--repeats", type=int, default=3, help="sampling runs per model; the fastest counts")
    args, overrides = parser.parse_known_args(argv)
    register_resolvers()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose("train", overrides=overrides)
    teacher, scheduler = load_teacher(cfg.model.path)
    student = load_quantized(args.student_dir)
    dtype = eval_dtype(cfg)
    for model in (teacher, student):
        model.eval().to(cfg.device)
    to_sampling_dtype(dtype, teacher, student)  # as dq-train casts them
    noise = make_noise(args.n, tuple(cfg.model.sample_shape), eval_seed(cfg)).to(dtype)  # dq-train's noise
    steps, batch = cfg.model.num_inference_steps, cfg.eval.batch_size
    _, t_s = best_time(teacher, scheduler, noise, steps, batch, args.repeats)
    samples, s_s = best_time(student, scheduler, noise, steps, batch, args.repeats)
    digest = hashlib.sha256(samples.float().numpy().tobytes()).hexdigest()[:16]
    print(
        f"{args.n} images, DDIM-{steps}, batch {batch}, {cfg.device} {dtype_name(dtype)}, "
        f"{torch.get_num_threads()} thread(s), best of {args.repeats}: teacher {t_s:.2f} s, student {s_s:.2f} s "
        f"({s_s / t_s:.2f}x the teacher), student samples sha256 {digest}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
