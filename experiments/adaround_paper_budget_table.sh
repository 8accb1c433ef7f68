#!/usr/bin/env bash
# DilateQuant with AdaRound at the paper's budget (adaround_paper_budget.txt, adaround_paper_budget_w4a4.txt; the
# machine with AMX, cpu 4c96709d) against DilateQuant at the paper's budget (paper_setting_paper_budget_current.txt; an
# AVX-512 machine without AMX), calib.seed 1 / 2 / 3, from the committed tables:
#   bash experiments/adaround_paper_budget_table.sh [TABLE.md]
# writes experiments/tables/adaround_paper_budget_draws.md (or the path given). The AdaRound runs'
# `experiment=[paper_budget,dilatequant_adaround]` is written as `experiment=paper_budget` and the four overrides
# conf/experiment/dilatequant_adaround.yaml sets, so that they pair with the paper-budget runs on the same draws; the
# two sets ran on different machines, so each pair also holds the machines' float order.
set -euo pipefail
md=$(realpath -m "${1:-$(dirname "$0")/tables/adaround_paper_budget_draws.md}")
source "$(dirname "$0")/paired_tables.sh"
cp "$t/paper_setting_paper_budget_current.csv" "$t/adaround_paper_budget.csv" "$tmp/"
ada='quantizer.spec.weight_init=mse distill.lr_weight=0 distill.lr_weight_qparams=0 distill.lr_rounding=0.3'
both='experiment=\[paper_budget,dilatequant_adaround\]'
sed -i "s/$both/experiment=paper_budget $ada/" "$tmp/adaround_paper_budget.csv"
python experiments/draws.py "$tmp"/paper_setting_paper_budget_current.csv "$tmp"/adaround_paper_budget.csv \
  --against "bits=w4a8 experiment=paper_budget" --against "bits=w4a4 experiment=paper_budget" --out "$md"
