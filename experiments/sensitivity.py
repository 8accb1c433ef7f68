"""Diagnostic (not a test): which quantizers of a student cost the most.

    python experiments/sensitivity.py --student multirun/.../student [--by role|block|layer] [--out table.md]
    python experiments/sensitivity.py --ptq bits=w4a4 quantizer=dilatequant +quantizer.temporal=true --weights-fp

Takes a student `dq-train` saved (`--student <run>/student`) or builds an untrained one the way `dq-eval` does
from config overrides (`--ptq ...`: calibrated activation ranges, no training), then switches groups of quantizers
back to full precision one group at a time and scores the student each time. `--weights-fp` keeps every weight at
full precision in every row (an activation-only study).

Scores: `--metric sqnr` (default) is the noise-prediction SQNR against the teacher on `--n` held-out calibration
pairs (calib.seed = seed + 100, not the set the ranges were fitted on; `--calib-seed 1` scores the default
training pairs instead): cheap and smooth. It weighs every step alike, so an error that only matters at the
smallest timesteps (where the noise prediction is most sensitive to its input) can look larger than it is in the
samples. `--metric psnr` samples `--n` images with the teacher and the student from identical noise and scores the
PSNR between them: what the benchmark tables report, but at W4A4 the trajectories diverge and releasing a group
moves it by noise. The table ends with the median weight and activation step sizes.

Read a trained student's table with care: training adapts each layer to the quantization error of the layers
around it, so releasing one group can *lower* the score. The untrained `--ptq` student measures what each group's
quantization costs before any training.

`--by role` groups activation quantizers by the layer role (network input, conv1, conv2, conv_shortcut,
attention, time embedding, ...); `--by layer` is one row per layer; `--by block` switches weights and
activations of one block at a time; `--by none` prints only the whole-model rows. Rows also give "weights only"
(activations off) and "activations only" (weights off) for the whole model. A group whose release gains many dB
is where the bit budget goes.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch import nn

from dq.config import register_resolvers
from dq.distill.blocks import partition_blocks
from dq.metrics import psnr, sqnr_db
from dq.models import ddim_sample, load_teacher, make_noise
from dq.paths import conf_dir
from dq.quant import act_quantizers, load_quantized, weight_quantizers
from dq.quant.model import TIMESTEPS_BUFFER
from dq.quant.quantizer import TemporalQuantizer, UniformQuantizer
from dq.student import build_student, calibration_set

# role of an activation quantizer, from its module path (first match wins)
ROLES: list[tuple[str, str]] = [
    (r"^conv_in\.", "conv_in: the network input x_t"),
    (r"^conv_out\.", "conv_out input"),
    (r"^time_embedding\.", "time embedding MLP"),
    (r"\.time_emb_proj\.", "time_emb_proj"),
    (r"\.processor\.prob_quantizer$", "attention probabilities"),
    (r"\.processor\.[qkv]_quantizer$", "attention q / k / v matmul inputs"),
    (r"\.to_[qkv]\.", "attention to_q / to_k / to_v inputs"),
    (r"\.to_out\.", "attention to_out input"),
    (r"\.conv1\.", "resnet conv1"),
    (r"\.conv2\.", "resnet conv2"),
    (r"\.conv_shortcut\.", "resnet conv_shortcut (skip concat)"),
    (r"(down|up)samplers\.", "down / up samplers"),
]


def role_of(name: str) -> str:
    """The role group of a quantizer's module path (`ROLES`), "other" when none matches."""
    return next((role for pattern, role in ROLES if re.search(pattern, name)), "other")


@contextmanager
def released(quantizers: list[nn.Module]) -> Iterator[None]:
    """Switch `quantizers` off (identity) inside the block, restoring their flags after."""
    before = [q.enabled for q in quantizers]
    for q in quantizers:
        q.enabled = False
    try:
        yield
    finally:
        for q, b in zip(quantizers, before, strict=True):
            q.enabled = b


def groups_by_role(student: nn.Module) -> dict[str, list[nn.Module]]:
    out: dict[str, list[nn.Module]] = {}
    for name, q in act_quantizers(student):
        out.setdefault(role_of(name), []).append(q)
    return out


def groups_by_layer(student: nn.Module) -> dict[str, list[nn.Module]]:
    """Activation quantizers per layer (a split layer has two: `act_quantizer` and `act_quantizer_skip`)."""
    out: dict[str, list[nn.Module]] = {}
    for name, q in act_quantizers(student):
        out.setdefault(name.rsplit(".", 1)[0], []).append(q)
    return out


def groups_by_block(student: nn.Module, teacher: nn.Module) -> dict[str, list[nn.Module]]:
    out: dict[str, list[nn.Module]] = {}
    quantizers = (UniformQuantizer, TemporalQuantizer)
    for block in partition_blocks(teacher):  # same module names; the student refuses the probe's timestep
        modules = [student.get_submodule(name) for name in block.modules]
        qs = [q for m in modules for q in m.modules() if isinstance(q, quantizers)]
        if qs:
            out[block.name] = qs
    return out


def median_step(quantizers: list[nn.Module]) -> float:
    """Median |Δ| over every step size of `quantizers` (per channel / per sampling step)."""
    return torch.cat([q.scale.detach().abs().flatten() for q in quantizers]).median().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--student", type=Path, help="a directory save_quantized wrote (<run dir>/student)")
    src.add_argument("--ptq", nargs="+", metavar="OVERRIDE", help="dq-eval config overrides of an untrained student")
    p.add_argument("--weights-fp", action="store_true", help="every weight at full precision in every row")
    p.add_argument(
        "--metric", choices=["sqnr", "psnr"], default="sqnr",
        help="sqnr: one-step noise-prediction SQNR on held-out calibration pairs (calib.seed --seed + 100); "
        "psnr: PSNR of DDIM samples to the teacher's from identical noise (saturates once trajectories diverge)",
    )  # fmt: skip
    p.add_argument("--n", type=int, default=512, help="held-out pairs (sqnr) or samples (psnr) per row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--by", choices=["role", "block", "layer", "none"], default="role", help="none: whole-model rows only"
    )
    p.add_argument(
        "--calib-seed", type=int, default=None, help="sqnr pairs from this calib.seed (default seed + 100, held out)"
    )
    p.add_argument("--teacher", default=None, help="the teacher directory (default: model.path, the shipped one)")
    p.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    args = p.parse_args()

    register_resolvers()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("eval", [*(args.ptq or []), "eval.progress=false"])
    if args.teacher is not None:  # one teacher for the student, the held-out pairs and the scores
        path_given = any(o.lstrip("+").startswith("model.path=") for o in args.ptq or [])
        if path_given and Path(cfg.model.path).resolve() != Path(args.teacher).resolve():
            p.error(f"--teacher {args.teacher} and model.path={cfg.model.path} name two teachers: give one")
        cfg.model.path = args.teacher
    teacher, scheduler = load_teacher(cfg.model.path)
    size = teacher.config.sample_size
    height, width = (size, size) if isinstance(size, int) else size
    cfg.model.sample_shape = [teacher.config.in_channels, height, width]  # also with --student (no overrides)
    if args.student is not None:
        student, source = load_quantized(args.student), str(args.student)
    else:
        student, _ = build_student(cfg, teacher, scheduler)
        source = "untrained " + " ".join(args.ptq)
    steps = len(getattr(student, TIMESTEPS_BUFFER))

    if args.metric == "sqnr":  # held-out pairs: not the calibration set the ranges were fitted on
        pairs_seed = args.seed + 100 if args.calib_seed is None else args.calib_seed
        cfg.calib.seed, cfg.calib.n_calib, cfg.model.num_inference_steps = pairs_seed, args.n, steps
        held_out = calibration_set(cfg, teacher, scheduler)
        x_t, t = held_out.x_t, held_out.timesteps

        @torch.no_grad()
        def run(m: nn.Module) -> torch.Tensor:
            return torch.cat([m(x, s).sample for x, s in zip(x_t.split(128), t.split(128), strict=True)])

        ref = run(teacher)
        score = lambda m: sqnr_db(run(m), ref)  # noqa: E731
    else:
        noise = make_noise(args.n, tuple(cfg.model.sample_shape), args.seed)
        run = lambda m: ddim_sample(m, scheduler, noise, steps, progress=False)  # noqa: E731
        ref = run(teacher)
        score = lambda m: psnr(run(m), ref)  # noqa: E731

    # quantizers already off (fp_network_input, fp_output_layer_input) cost nothing: left out of rows and medians
    all_w = [q for _, q in weight_quantizers(student) if q.enabled]
    all_a = [q for _, q in act_quantizers(student) if q.enabled]
    groups = {
        "role": lambda: groups_by_role(student),
        "block": lambda: groups_by_block(student, teacher),
        "layer": lambda: groups_by_layer(student),
        "none": dict,
    }[args.by]()
    groups = {name: on for name, qs in groups.items() if (on := [q for q in qs if q.enabled])}
    if args.weights_fp:
        for q in all_w:
            q.enabled = False
        source += ", weights FP"
    rows: list[tuple[str, int, float]] = [("all quantized", 0, score(student))]
    if not args.weights_fp:
        with released(all_a):
            rows.append(("weights only (all activations FP)", len(all_a), score(student)))
        with released(all_w):
            rows.append(("activations only (all weights FP)", len(all_w), score(student)))
    for name, qs in groups.items():
        with released(qs):
            rows.append((f"{name} released", len(qs), score(student)))
        print(f"{rows[-1][0]}: {rows[-1][2]:.2f} dB", flush=True)

    base = rows[0][2]
    what = {
        "sqnr": f"noise-prediction SQNR on {args.n} calibration pairs (calib.seed {cfg.calib.seed})",
        "psnr": f"PSNR of {args.n} DDIM samples to the teacher's",
    }[args.metric]
    lines = [
        f"Sensitivity of `{source}` (DDIM-{steps}, seed {args.seed}, by {args.by}): {what}, "
        "with one group at full precision.",
        "",
        "| group | quantizers | dB | gain dB |",
        "|---|---|---|---|",
        *(f"| {name} | {k} | {v:.2f} | {v - base:+.2f} |" for name, k, v in rows),
        "",
        f"Median step size: weights {median_step(all_w):.2e}, activations {median_step(all_a):.2e}.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
