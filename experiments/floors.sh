#!/usr/bin/env bash
# How close to full precision the quality targets of the embedded benchmark can get at all
# (experiments/tables/floors.md; BENCHMARKS.md "What limits W4A8"). Two streams side by side, one thread each (2-core
# CPU: about 25 minutes):
#   - the 8-bit network input x_t alone: an untrained DilateQuant student (distill=none: WD, per-step ranges from
#     calibration, split) with every quantizer but conv_in's input switched off by release_eval.py --keep, i.e. the
#     teacher fed x_t rounded to the per-step 8-bit grid; with the default MSE ranges (on two evaluation noises) and
#     with min-max ranges;
#   - 4-bit activations alone: W8A4 (bits=w4a4 with 8-bit weights; the BKD rates scale with distill.lr_bits),
#     untrained and trained over three calibration draws; and with the 4-bit students' BKD rates (lr_bits=null).
#   bash experiments/floors.sh [ROOT]   (default: multirun/floors_<date-time>; must not exist yet)
set -euo pipefail
source "$(dirname "$0")/study_root.sh" floors "${1:-}"
q="logger=csv eval.progress=false"
keep="python experiments/release_eval.py"
(
  dq-train distill=none $q hydra.run.dir=$root/none/w4a8_mse
  $keep $root/none/w4a8_mse conv_in.act_quantizer --keep --out $root/only_input/mse
  $keep $root/none/w4a8_mse conv_in.act_quantizer --keep --seed 1 --out $root/only_input_seed1/mse
  dq-train distill=none quantizer.spec.act_init=minmax $q hydra.run.dir=$root/none/w4a8_minmax
  $keep $root/none/w4a8_minmax conv_in.act_quantizer --keep --out $root/only_input/minmax
  dq-train distill=none bits=w4a4 bits.weight_bits=8 $q hydra.run.dir=$root/none/w8a4
) > "$root/a.log" 2>&1 &
a=$!
(
  dq-train -m bits=w4a4 bits.weight_bits=8 calib.seed=1,2,3 $q hydra.sweep.dir=$root/w8a4
  dq-train bits=w4a4 bits.weight_bits=8 distill.lr_bits=null $q hydra.run.dir=$root/w8a4_rates4/s1
) > "$root/b.log" 2>&1 &
b=$!
wait $a
wait $b
python experiments/collect.py "$root" --out experiments/tables/floors
