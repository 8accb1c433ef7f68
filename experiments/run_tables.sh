#!/usr/bin/env bash
# Re-run the ablation / baseline and min-max PTQ tables under experiments/tables (2-core CPU: over an hour).
# Two streams side by side, one thread each, so train_s compares the runs of these tables with each other;
# the single-run timing of the default dq-train in the top-level README comes from running it alone.
#   bash experiments/run_tables.sh [SWEEP_ROOT]   (default: multirun/tables_<date-time>; must not exist yet)
set -euo pipefail
source "$(dirname "$0")/study_root.sh" tables "${1:-}"
common="logger=csv eval.progress=false"

stream_a() {
  dq-train -m bits=w4a8,w4a4 callbacks=dilatequant,tpq,weight_dilation $common hydra.sweep.dir=$root/ablation/callbacks
  dq-train -m bits=w4a8,w4a4 experiment=ptq_recon $common hydra.sweep.dir=$root/ablation/ptq_recon
  dq-train -m bits=w4a8,w4a4 experiment=qat_lsq $common hydra.sweep.dir=$root/ablation/qat_lsq
}
stream_b() {
  dq-train -m bits=w4a8,w4a4 distill=model_kd $common hydra.sweep.dir=$root/ablation/model_kd
  dq-eval -m quantizer=ptq_minmax bits=w8a8,w4a8,w4a6,w4a4 quantizer.temporal=false,true $common \
    hydra.sweep.dir=$root/ptq_minmax
  dq-train -m bits=w4a8,w4a4 experiment=efficientdm $common hydra.sweep.dir=$root/ablation/efficientdm
}
stream_a > "$root.a.log" 2>&1 &
a=$!
stream_b > "$root.b.log" 2>&1 &
b=$!
wait $a
wait $b
python experiments/collect.py "$root/ablation" --out experiments/tables/ablation
python experiments/collect.py "$root/ptq_minmax" --out experiments/tables/ptq_minmax
