#!/usr/bin/env bash
# What limits DilateQuant W4A8 on the embedded benchmark (experiments/tables/limits_study.md; BENCHMARKS.md "What limits
# W4A8"). Two streams side by side, one thread each (2-core CPU: about 2.5 hours):
#   - the default over three calibration draws (calib.seed 1 / 2 / 3), and two calibration changes over the same
#     draws at W4A8 and W4A4: MSE-initialised weight step sizes, pairs drawn from 512 trajectories instead of 21;
#   - BKD learning rates: latent weights (lr_weight) and weight step sizes (lr_weight_qparams) at W4A8;
#   - W8A8: DilateQuant without training (distill=none) against BKD, to see what training does where the
#     quantization error is small.
#   bash experiments/limits_study.sh [SWEEP_ROOT]   (default: multirun/limits_<date-time>; must not exist yet)
set -euo pipefail
source "$(dirname "$0")/study_root.sh" limits "${1:-}"
q="logger=csv eval.progress=false"
seeds="calib.seed=1,2,3"
(
  dq-train -m bits=w4a8 $seeds $q hydra.sweep.dir=$root/default
  dq-train -m bits=w4a8 quantizer.spec.weight_init=mse $seeds $q hydra.sweep.dir=$root/weight_init_mse/w4a8
  dq-train -m bits=w4a8 calib.n_traj=512 $seeds $q hydra.sweep.dir=$root/n_traj_512/w4a8
  dq-train -m bits=w4a8 distill.lr_weight=1e-4,3e-4 $q hydra.sweep.dir=$root/lr_weight
  dq-train -m bits=w8a8 distill=none,bkd $q hydra.sweep.dir=$root/w8a8
) > "$root/a.log" 2>&1 &
a=$!
(
  dq-train -m bits=w4a4 quantizer.spec.weight_init=mse $seeds $q hydra.sweep.dir=$root/weight_init_mse/w4a4
  dq-train -m bits=w4a4 calib.n_traj=512 $seeds $q hydra.sweep.dir=$root/n_traj_512/w4a4
  dq-train -m bits=w4a8 distill.lr_weight_qparams=1e-4,1e-5 $seeds $q hydra.sweep.dir=$root/lr_weight_qparams
  dq-train -m bits=w8a8 distill.lr_weight=1e-4 $q hydra.sweep.dir=$root/w8a8_lr_weight
  dq-train -m bits=w8a8 distill.lr_weight_qparams=1e-5 $q hydra.sweep.dir=$root/w8a8_lr_weight_qparams
  dq-train -m bits=w8a8 distill.lr_weight=1e-4,1e-5 distill.lr_weight_qparams=1e-5 $q hydra.sweep.dir=$root/w8a8_both
) > "$root/b.log" 2>&1 &
b=$!
wait $a
wait $b
python experiments/collect.py "$root" --out experiments/tables/limits_study
