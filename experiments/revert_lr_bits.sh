#!/usr/bin/env bash
# The two BKD defaults added together (experiments/tables/revert_lr_bits.md; BENCHMARKS.md "Blocks that training
# makes worse, and learning rates across bit-widths"): distill.revert_worse (a block whose training raises its calibration MSE is put back) and
# distill.lr_bits (an 8-bit student's weight rates x 15/255). Two streams side by side, one thread each (2-core CPU:
# about 70 minutes):
#   - the default at W4A8 and W4A4 over three calibration draws (compare: limits_study / split tables, made before
#     both existed, i.e. with distill.revert_worse=false distill.lr_bits=null);
#   - W8A8 with both, and with revert only (lr_bits=null); the WD / TPQ ablation at W4A8 / W4A4 with both; W4A8
#     with every activation rate lowered to 5.9e-6 instead (calib.seed 1).
#   bash experiments/revert_lr_bits.sh [SWEEP_ROOT]   (default: multirun/revert_<date-time>; must not exist yet)
set -euo pipefail
source "$(dirname "$0")/study_root.sh" revert "${1:-}"
q="logger=csv eval.progress=false"
(
  dq-train -m bits=w4a8 calib.seed=1,2,3 $q hydra.sweep.dir=$root/w4a8
  dq-train -m bits=w4a4 calib.seed=1,2,3 $q hydra.sweep.dir=$root/w4a4
  dq-train -m bits=w8a8 distill.lr_bits=null $q hydra.sweep.dir=$root/w8a8_no_lr_bits
) > "$root/a.log" 2>&1 &
a=$!
(
  dq-train -m bits=w8a8 $q hydra.sweep.dir=$root/w8a8
  dq-train -m bits=w4a8,w4a4 callbacks=tpq,weight_dilation $q hydra.sweep.dir=$root/ablation
  dq-train -m bits=w4a8 calib.seed=1 distill.lr_act_qparams=5.9e-6 $q hydra.sweep.dir=$root/w4a8_lr_act
) > "$root/b.log" 2>&1 &
b=$!
wait $a
wait $b
python experiments/collect.py "$root" --out experiments/tables/revert_lr_bits
