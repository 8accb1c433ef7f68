"""Evaluate a finished dq-train run's student again with some quantizers switched off (full precision there).

    python experiments/release_eval.py <run_dir> conv_in.act_quantizer [more names] --out /tmp/released
    python experiments/release_eval.py <run_dir> conv_in.act_quantizer --keep --out /tmp/only_input

Each name selects the student's quantizers whose module path it matches (`dq.quant.spec.module_matches`, as for
`keep_8bit`: the path itself, a prefix up to a dot, or a glob; `conv_in.act_quantizer`: the 8-bit quantizer of the
network input x_t; `'*.weight_quantizer'`: every weight quantizer). The evaluation is dq-train's own
(`evaluate_models` with the run's config: the same noise, N, sampler, FID features), so its FID / IS / PSNR to the
teacher compare directly with the run's `results.json`; nothing is retrained. Prints both and writes the new
`results.json`, sample grid and the run's `.hydra/` under `--out` (`collect.py` then lists the run's overrides and
`off=<name>` for each name given). `--keep` inverts the selection: every other quantizer is switched off, so the
named ones alone are measured (with `conv_in.act_quantizer`: the teacher with only its input x_t rounded to the
run's per-step 8-bit grid, the floor that this one rounding sets). Unlike `sensitivity.py`'s noise-prediction SQNR,
this scores samples.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf, open_dict

from dq.config import register_resolvers
from dq.evaluation import evaluate_models
from dq.models import load_teacher
from dq.quant import act_quantizers, load_quantized, weight_quantizers
from dq.quant.spec import module_matches


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a finished dq-train run directory")
    p.add_argument("names", nargs="+", help="quantizer module paths, prefixes up to a dot or globs to switch off")
    p.add_argument("--keep", action="store_true", help="switch off every quantizer except the named ones")
    p.add_argument("--out", type=Path, required=True, help="directory for the new results.json and grid")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, help="another evaluation noise (teacher re-scored with it); default: the run's")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    register_resolvers()
    if args.out.resolve() == args.run.resolve():
        raise SystemExit(f"--out {args.out} is the run itself: its results.json would be overwritten; pick another")
    saved = json.loads((args.run / "results.json").read_text())  # before anything is written
    cfg = OmegaConf.load(args.run / ".hydra" / "config.yaml")
    with open_dict(cfg):
        cfg.run_dir, cfg.eval.progress = str(args.out), False
        if args.seed is not None:  # the run's noise unless told: eval.seed where its config has one, else seed
            cfg.seed = cfg.eval.seed = args.seed
    teacher, scheduler = load_teacher(cfg.model.path)
    student = load_quantized(args.run / "student", device=cfg.device)
    on = [(name, q) for name, q in [*weight_quantizers(student), *act_quantizers(student)] if q.enabled]
    # one already off (fp_network_input, fp_output_layer_input) changes nothing: neither listed nor matched
    named = [name for name, _ in on if any(module_matches(n, name) for n in args.names)]
    if missing := [n for n in args.names if not any(module_matches(n, r) for r in named)]:
        raise SystemExit(f"no quantizer of {args.run / 'student'} that is on matches {missing}")
    released = [name for name, _ in on if (name in named) != args.keep]
    for name, quantizer in on:
        quantizer.enabled = name not in released
    print(f"kept on: {', '.join(named)}" if args.keep else f"switched off: {', '.join(released)}")
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(args.run / ".hydra", args.out / ".hydra", dirs_exist_ok=True)  # collect.py reads the overrides
    # collect.py marks the row with the names as given (`off=`, or `only=` where `kept` is there)
    method = saved.get("method", {}) | {"released": released, "run": str(args.run), "selected": args.names}
    if args.keep:
        method["kept"] = named
    new = evaluate_models(cfg, teacher.to(cfg.device).eval(), scheduler, student.eval(), args.out, [], method, {})
    seeds = saved["metric"]["seed"], new["metric"]["seed"]
    if seeds[0] != seeds[1]:  # ratios to FP compare; FIDs of different noises do not
        fids = saved["teacher"]["fid"], new["teacher"]["fid"]
        print(f"teacher FID {fids[0]:.2f} (seed {seeds[0]}), {fids[1]:.2f} (seed {seeds[1]})")
    for label, r in (("as trained", saved["student"]), ("kept on" if args.keep else "switched off", new["student"])):
        if "fid" not in r:  # a student that sampled NaN or infinite images has no scores
            print(f"{label:>12}: {r.get('non_finite_samples')} samples NaN or infinite, not scored")
            continue
        print(f"{label:>12}: FID {r['fid']:.2f}  IS {r['is']:.2f}  PSNR to teacher {r['psnr_to_teacher']:.2f} dB")


if __name__ == "__main__":
    main()
