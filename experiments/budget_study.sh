#!/usr/bin/env bash
# Does the paper's calibration budget close the gap to FP? DilateQuant at W4A8 and W4A4 with dq's default budget
# (512 calibration pairs, 120 iterations of batch 32 per block: 3,840 samples seen per block) against the paper's
# 5,120 pairs with 300 iterations of batch 128 per block (`experiment=paper_budget`: 38,400 samples seen per block,
# 7.5 epochs of the pairs) (experiments/tables/budget_study.md; README "Training budget").
# All four runs start at once: meant for one GPU, where this 649K-parameter UNet is launch-bound (a batch of 128
# costs about what a batch of 32 does) and four processes share the card.
#   bash experiments/budget_study.sh SWEEP_ROOT [overrides for every run, e.g. trainer=gpu]
# Each run's results.json is also copied to SWEEP_ROOT/<name>.json as it finishes; the table is written last.
set -uo pipefail
root=${1:?usage: budget_study.sh SWEEP_ROOT [overrides]}
shift
if [ -e "$root" ]; then echo "$root exists: pick a fresh directory (old block checkpoints would be refused)" >&2; exit 1; fi
mkdir -p "$root"
declare -A runs=(
  [w4a8_default]="bits=w4a8"
  [w4a8_paper]="bits=w4a8 experiment=paper_budget"
  [w4a4_default]="bits=w4a4"
  [w4a4_paper]="bits=w4a4 experiment=paper_budget"
)
pids=()
for name in "${!runs[@]}"; do
  # shellcheck disable=SC2086  # the overrides are meant to split into words
  ( python3 -m dq.train ${runs[$name]} logger=csv eval.progress=false "$@" hydra.run.dir="$root/$name" \
      > "$root/$name.log" 2>&1 && cp "$root/$name/results.json" "$root/$name.json" ) &
  pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=$((failed + 1)); done
python3 experiments/collect.py "$root" --out "$root/budget_study"
[ "$failed" -eq 0 ] || { echo "$failed run(s) failed: see $root/<name>.log" >&2; exit 1; }
