"""Train one block of a finished dq-train run again with other learning rates, and print its calibration MSE.

    python experiments/block_lr_probe.py <run_dir> up_blocks.1.attentions.1 1e-3,1e-3,1e-4 1e-3,1e-3,0

Each setting is `lr_weight,lr_weight_qparams,lr_act_qparams`; the block trains `distill.iters_per_block` steps of the
run's batch size, learning-rate schedule and `lr_act_step_rel` (when the run set it, activation step sizes move at that
relative rate and the setting's lr_act_qparams only moves zero-points) on the run's calibration pairs (from the cache),
starting from the run's saved student. A run trained with `lr_zero_point`, `lr_lora`, `act_drop_prob`, `dampen` or
`freeze` is refused: the probe does not reproduce them. The block must be one that `revert_worse` put back (its history
entry says `"kept": "untrained"`): then the saved student holds it exactly as it was before training, behind the trained
blocks before it.
`--freeze prob_quantizer` keeps the parameters whose name holds that text frozen. Prints, per setting, the block's
MSE to the teacher over the calibration set before and after, and the minibatch loss every 10 steps; first, the
block's activation quantizers with their starting step sizes.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf, open_dict

from dq.config import register_resolvers
from dq.distill import BlockwiseDistillation
from dq.models import load_teacher
from dq.quant import act_quantizers, load_quantized
from dq.student import calibration_set

NOT_REPRODUCED = ("lr_zero_point", "lr_lora", "act_drop_prob", "dampen", "freeze")  # training settings it leaves out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a finished dq-train run directory")
    p.add_argument("block", help="block name, e.g. up_blocks.1.attentions.1")
    p.add_argument("settings", nargs="+", help="lr_weight,lr_weight_qparams,lr_act_qparams")
    p.add_argument("--freeze", default=None, help="also keep the block's parameters whose name holds this frozen")
    args = p.parse_args()
    torch.set_num_threads(1)
    register_resolvers()
    history = json.loads((args.run / "checkpoints" / "last.json").read_text())["history"]
    kept = {h["block"]: h.get("kept", "trained") for h in history}
    if kept.get(args.block) != "untrained":
        raise SystemExit(f"{args.block}: its history in {args.run} says {kept.get(args.block)!r}, not 'untrained'; "
                         "the saved student does not hold it as it was before training")  # fmt: skip
    cfg = OmegaConf.load(args.run / ".hydra" / "config.yaml")
    used = {k: cfg.distill.get(k) for k in NOT_REPRODUCED if cfg.distill.get(k) not in (None, 0, 0.0)}
    if used:
        raise SystemExit(f"{args.run} trained with " + ", ".join(f"distill.{k}={v}" for k, v in used.items())
                         + ": this probe retrains a block without them, so its MSE would not be the run's")  # fmt: skip
    with open_dict(cfg):
        cfg.run_dir, cfg.eval.progress = str(args.run), False
    teacher, scheduler = load_teacher(cfg.model.path)
    calib = calibration_set(cfg, teacher, scheduler)
    saved = load_quantized(args.run / "student")
    for name, q in act_quantizers(saved.get_submodule(args.block)):  # the block's starting activation step sizes
        step = q.scale.detach()
        print(f"{name}: {q.bits}-bit, step size {step.min():.3g} .. {step.max():.3g} over {step.numel()} steps")
    n = int(cfg.distill.iters_per_block)
    rel = cfg.distill.get("lr_act_step_rel")
    print(f"the run's schedule: {cfg.distill.lr_schedule}; activation step sizes: "
          + (f"relative rate {rel} (the settings' lr_act_qparams moves zero-points only)" if rel is not None
             else "at lr_act_qparams"))  # fmt: skip
    for setting in args.settings:
        lr_weight, lr_weight_qparams, lr_act_qparams = map(float, setting.split(","))
        module = BlockwiseDistillation(
            teacher, copy.deepcopy(saved), calib, iters_per_block=n, batch_size=int(cfg.distill.batch_size),
            lr_weight=lr_weight, lr_weight_qparams=lr_weight_qparams, lr_act_qparams=lr_act_qparams,
            lr_bits=cfg.distill.get("lr_bits"), lr_act_step_rel=cfg.distill.get("lr_act_step_rel"),
            lr_schedule=str(cfg.distill.lr_schedule), revert_worse=False, calib_batch_size=int(cfg.calib.batch_size),
            seed=int(cfg.seed), progress=False,
        )  # fmt: skip
        opt = module.make_adam()
        frozen = {id(q) for name, q in module.student.named_parameters() if args.freeze and args.freeze in name}
        module._trainable = {id(q) for g in opt.param_groups for q in g["params"]} - frozen
        k = module.block_names.index(args.block)
        module.start_block(k)  # caches the block's inputs, draws its minibatches, measures mse_before
        curve = []
        for i in range(n):
            module.schedule_lr(i, n, opt)
            loss = module.block_loss(k, module._batches[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i % 10 == 0:
                curve.append(f"{loss.item():.3g}")
        print(f"{setting}: mse {module._mse_before:.4g} -> {module.block_mse(k):.4g}; loss every 10 steps "
              f"{' '.join(curve)}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
