#!/usr/bin/env bash
# Calibration-set size x calibration seed, DilateQuant (without shortcut splitting, as measured) at W4A8 and W4A4
# (2-core CPU: about 45 minutes).
# Two streams side by side (W4A8 | W4A4), one thread each; the eval noise (seed) is the same in every run, so
# PSNR-to-teacher compares the students sample by sample. Writes experiments/tables/calib_study.{md,csv}.
#   bash experiments/calib_study.sh [SWEEP_ROOT]   (default: multirun/calib_<date-time>; must not exist yet)
set -euo pipefail
source "$(dirname "$0")/study_root.sh" calib "${1:-}"
common="calib.n_calib=512,2048 calib.seed=1,2,3 quantizer.spec.split_concat=false logger=csv eval.progress=false"
dq-train -m bits=w4a8 $common hydra.sweep.dir=$root/w4a8 > "$root.a.log" 2>&1 &
a=$!
dq-train -m bits=w4a4 $common hydra.sweep.dir=$root/w4a4 > "$root.b.log" 2>&1 &
b=$!
wait $a
wait $b
python experiments/collect.py "$root" --out experiments/tables/calib_study
