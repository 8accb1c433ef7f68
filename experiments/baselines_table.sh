#!/usr/bin/env bash
# The README's table of DilateQuant, its ablation and the baselines, and its plot: every row over calib.seed 1 / 2 / 3
# on one machine (the one with AMX, cpu 4c96709d), paired with the default's runs on the same draws. From the committed
# tables of experiments/runs/baselines_one_machine.txt and of the runs that list reuses:
#   bash experiments/baselines_table.sh [TABLE.md PLOT.png]
# writes experiments/tables/baselines_one_machine_draws.md and experiments/figures/baselines.png (or the paths given).
# Runs that set by hand what an experiment config sets now are named by that config (ptq_recon_adaround.txt's AdaRound
# runs: experiment=ptq_recon; dilatequant_adaround.txt's: experiment=dilatequant_adaround), so that each setting is one
# row; the runs each list adds for another question (adam_eps=1e-12, ptq_recon without AdaRound, calib.seed 4, a repeat
# of a default run) are left out. qat_lsq's rows are those with LSQ's weights (qat_lsq_symmetric.txt, since 7a55b9e);
# its earlier runs are in experiments/tables/qat_lsq_symmetric_draws.md (experiments/qat_lsq_symmetric_table.sh).
set -euo pipefail
md=$(realpath -m "${1:-$(dirname "$0")/tables/baselines_one_machine_draws.md}")
png=$(realpath -m "${2:-$(dirname "$0")/figures/baselines.png}")
source "$(dirname "$0")/paired_tables.sh"
keep adam_eps '^fp|,bits=w4a[48] calib.seed=[123],'
keep dilatequant_adaround 'lr_rounding'
adaround=' quantizer.spec.weight_init=mse distill.lr_weight_qparams=0 distill.lr_rounding=3e-1'
sed -i "s/ distill.lr_weight=0$adaround/ experiment=dilatequant_adaround/" "$tmp/dilatequant_adaround.csv"
keep ptq_recon_adaround 'ptq_recon calib.seed=[23] quantizer'
sed -i "s/$adaround//" "$tmp/ptq_recon_adaround.csv"
keep qat_lsq_symmetric 'experiment=qat_lsq calib.seed=[123],'
grep -v 'experiment=qat_lsq' "$t/baselines_one_machine.csv" > "$tmp/baselines_one_machine.csv"
labels=()
for bits in w4a8 w4a4; do
  B=${bits^^}
  labels+=(--label "bits=$bits as DilateQuant, $B"
           --label "bits=$bits callbacks=tpq as without Weight Dilation, $B"
           --label "bits=$bits callbacks=weight_dilation as without TPQ, $B"
           --label "bits=$bits distill=model_kd as whole-model KD instead of BKD, $B"
           --label "bits=$bits experiment=dilatequant_adaround as DilateQuant with AdaRound, $B"
           --label "bits=$bits experiment=ptq_recon as ptq_recon (BKD of quantizers, AdaRound), $B"
           --label "bits=$bits experiment=qat_lsq as qat_lsq, $B"
           --label "bits=$bits experiment=efficientdm_tuned as efficientdm_tuned, $B")
done
python experiments/draws.py "$tmp"/adam_eps.csv "$tmp"/baselines_one_machine.csv "$tmp"/dilatequant_adaround.csv \
  "$tmp"/ptq_recon_adaround.csv "$tmp"/qat_lsq_symmetric.csv --against bits=w4a8 --against bits=w4a4 \
  --out "$md" --plot "$png" "${labels[@]}"
