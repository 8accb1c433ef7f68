#!/usr/bin/env bash
# Does the paper's calibration budget close the gap to FP? DilateQuant at W4A8 and W4A4 with dq's default budget
# (512 calibration pairs, 120 iterations of batch 32 per block: 3,840 samples seen per block) against the paper's
# 5,120 pairs with 300 iterations of batch 128 per block (`experiment=paper_budget`: 38,400 samples seen per block,
# 7.5 epochs of the pairs) (experiments/tables/budget_study.md; BENCHMARKS.md "Training budget").
# All four runs start at once (experiments/parallel_runs.sh): meant for one GPU, where this 649K-parameter UNet is
# launch-bound (a batch of 128 costs about what a batch of 32 does) and four processes share the card.
#   bash experiments/budget_study.sh SWEEP_ROOT [overrides for every run, e.g. trainer=gpu]
exec bash "$(dirname "$0")/parallel_runs.sh" "${1:?usage: budget_study.sh SWEEP_ROOT [overrides]}" \
  "$(dirname "$0")/runs/budget_study.txt" "${@:2}"
