#!/usr/bin/env bash
# Which of the eight ResNet shortcut convs carries W4A4's loss: a finished W4A4 run (shortcut_study.sh's
# `$root/w4a4`) re-scored by release_eval.py with one conv_shortcut's input quantizers (both halves where split) at
# full precision at a time, then each half of the last one's split input alone (experiments/tables/shortcut_layers.md;
# one thread, about 30 minutes beside another job).
#   bash experiments/shortcut_layers.sh RUN [ROOT]   (ROOT default: multirun/shortcut_layers_<date-time>)
set -euo pipefail
run=$(realpath "${1:?usage: shortcut_layers.sh RUN [ROOT]}")
source "$(dirname "$0")/study_root.sh" shortcut_layers "${2:-}"
for layer in down_blocks.1.resnets.0 down_blocks.2.resnets.0 up_blocks.0.resnets.0 up_blocks.0.resnets.1 \
             up_blocks.1.resnets.0 up_blocks.1.resnets.1 up_blocks.2.resnets.0 up_blocks.2.resnets.1; do
  python experiments/release_eval.py "$run" "$layer.conv_shortcut.act_quantizer*" --out "$root/$layer"
done > "$root/release.log" 2>&1
last=up_blocks.2.resnets.1.conv_shortcut  # its input: cat([up-path features, skip = conv_in's output])
for half in act_quantizer act_quantizer_skip; do
  python experiments/release_eval.py "$run" "$last.$half" --out "$root/last_$half"
done >> "$root/release.log" 2>&1
python experiments/collect.py "$root" --out experiments/tables/shortcut_layers
