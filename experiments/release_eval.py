"""Evaluate a finished dq-train run's student again with some quantizers switched off (full precision there).

    python experiments/release_eval.py <run_dir> conv_in.act_quantizer [more names] --out /tmp/released

Each name selects the student's quantizers whose module path equals it or starts with it plus a dot
(`conv_in.act_quantizer`: the 8-bit quantizer of the network input x_t). The evaluation is dq-train's own
(`evaluate_models` with the run's config: the same noise, N, sampler, FID features), so its FID / IS / PSNR to the
teacher compare directly with the run's `results.json`; nothing is retrained. Prints both and writes the new
`results.json`, sample grid and the run's `.hydra/` under `--out` (`collect.py` then lists the run's overrides and
`off=<quantizer>`). Unlike `sensitivity.py`'s noise-prediction SQNR, this scores samples.
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a finished dq-train run directory")
    p.add_argument("names", nargs="+", help="quantizer module paths (or prefixes up to a dot) to switch off")
    p.add_argument("--out", type=Path, required=True, help="directory for the new results.json and grid")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    register_resolvers()
    if args.out.resolve() == args.run.resolve():
        raise SystemExit(f"--out {args.out} is the run itself: its results.json would be overwritten; pick another")
    saved = json.loads((args.run / "results.json").read_text())  # before anything is written
    cfg = OmegaConf.load(args.run / ".hydra" / "config.yaml")
    with open_dict(cfg):
        cfg.run_dir, cfg.eval.progress = str(args.out), False
    teacher, scheduler = load_teacher(cfg.model.path)
    student = load_quantized(args.run / "student", device=cfg.device)
    selects = lambda name, n: name == n or name.startswith(n + ".")  # noqa: E731
    released = []
    for name, quantizer in [*weight_quantizers(student), *act_quantizers(student)]:
        # one already off (fp_network_input) changes nothing: not listed
        if quantizer.enabled and any(selects(name, n) for n in args.names):
            quantizer.enabled = False
            released.append(name)
    if missing := [n for n in args.names if not any(selects(r, n) for r in released)]:
        raise SystemExit(f"no quantizer of {args.run / 'student'} that is on matches {missing}")
    print(f"switched off: {', '.join(released)}")
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(args.run / ".hydra", args.out / ".hydra", dirs_exist_ok=True)  # collect.py reads the overrides
    method = saved.get("method", {}) | {"released": released, "run": str(args.run)}  # collect.py reads its columns
    new = evaluate_models(cfg, teacher.to(cfg.device).eval(), scheduler, student.eval(), args.out, [], method, {})
    for label, r in (("as trained", saved["student"]), ("switched off", new["student"])):
        print(f"{label:>12}: FID {r['fid']:.2f}  IS {r['is']:.2f}  PSNR to teacher {r['psnr_to_teacher']:.2f} dB")


if __name__ == "__main__":
    main()
