#!/usr/bin/env bash
# qat_lsq with LSQ's weights (symmetric grids from 2 mean|w| / sqrt(Q_P), since 7a55b9e) against its weights before
# (dq's asymmetric grid from min-max), calib.seed 1 / 2 / 3, one machine (cpu 4c96709d), from the committed tables:
#   bash experiments/qat_lsq_symmetric_table.sh [TABLE.md]
# writes experiments/tables/qat_lsq_symmetric_draws.md (or the path given). The new runs' `experiment=qat_lsq` gets the
# two overrides its config now sets, so that they pair, draw by draw, against the earlier runs of `experiment=qat_lsq`
# (baselines_one_machine.txt; calib.seed 1 from qat_lsq_clip_first.txt); "change" is new minus before.
set -euo pipefail
md=$(realpath -m "${1:-$(dirname "$0")/tables/qat_lsq_symmetric_draws.md}")
source "$(dirname "$0")/paired_tables.sh"
keep baselines_one_machine '^fp|experiment=qat_lsq calib.seed=[23],'
keep qat_lsq_clip_first 'experiment=qat_lsq calib.seed=1,'
keep qat_lsq_symmetric 'experiment=qat_lsq calib.seed=[123],'
lsq='quantizer.spec.weight_symmetric=true quantizer.spec.weight_init=lsq'
sed -i "s/experiment=qat_lsq calib/experiment=qat_lsq $lsq calib/" "$tmp/qat_lsq_symmetric.csv"
python experiments/draws.py "$tmp"/baselines_one_machine.csv "$tmp"/qat_lsq_clip_first.csv \
  "$tmp"/qat_lsq_symmetric.csv \
  --against "bits=w4a8 experiment=qat_lsq" --against "bits=w4a4 experiment=qat_lsq" --out "$md"
