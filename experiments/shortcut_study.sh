#!/usr/bin/env bash
# Where W4A4 loses, on samples, and what keeping the ResNet shortcut convs at 8 bits buys
# (experiments/tables/shortcut_study.md; BENCHMARKS.md "Where W4A4 loses"). Two streams side by side, one thread each
# (2-core CPU):
#   - the default W4A4 (calib.seed 1), then release_eval.py re-scoring it with groups of activation quantizers at
#     full precision: the ResNet conv1 inputs, the conv_shortcut inputs (both halves where split), both; and with
#     only the weights and the 8-bit network input left quantized;
#   - bits=w4a4_shortcut8 (every conv_shortcut at 8 bits, weights and input, trained as such) over three draws,
#     and without Weight Dilation / without TPQ over the same draws (about 45 minutes in all).
#   bash experiments/shortcut_study.sh [ROOT]   (default: multirun/shortcut_<date-time>; must not exist yet)
set -euo pipefail
source "$(dirname "$0")/study_root.sh" shortcut "${1:-}"
q="logger=csv eval.progress=false"
release="python experiments/release_eval.py $root/w4a4"
(
  dq-train bits=w4a4 $q hydra.run.dir=$root/w4a4
  $release '*.conv1.act_quantizer' --out $root/released/conv1
  $release '*.conv_shortcut.act_quantizer*' --out $root/released/conv_shortcut
  $release '*.conv1.act_quantizer' '*.conv_shortcut.act_quantizer*' --out $root/released/conv1_conv_shortcut
  $release '*.weight_quantizer' conv_in.act_quantizer --keep --out $root/released/weights_and_input_only
  dq-train -m bits=w4a4_shortcut8 '~callbacks.weight_dilation' calib.seed=1,2,3 $q hydra.sweep.dir=$root/no_wd
) > "$root/a.log" 2>&1 &
a=$!
(
  dq-train -m bits=w4a4_shortcut8 calib.seed=1,2,3 $q hydra.sweep.dir=$root/w4a4_shortcut8
  dq-train -m bits=w4a4_shortcut8 '~callbacks.tpq' calib.seed=1,2,3 $q hydra.sweep.dir=$root/no_tpq
) > "$root/b.log" 2>&1 &
b=$!
wait $a
wait $b
python experiments/collect.py "$root" --out experiments/tables/shortcut_study
