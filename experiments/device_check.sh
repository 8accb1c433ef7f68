#!/bin/bash
# The GPU measurements, as one prepared call for a session that is lent a GPU machine (about 9 minutes). First run at
# dcf1e1a (BENCHMARKS.md "At the size of the paper's DDPM CIFAR-10 model"); run again to measure the TPQ calibration
# pass since it keeps and subsamples its values on the GPU:
#   1. the TPQ calibration pass on the GPU (experiments/bench_calibration.py trainer=gpu), default and paper budget;
#   2. dq-train at the size of the paper's DDPM CIFAR-10 model (experiments/bench_scale.py), dq's default budget and
#      the paper's (experiment=paper_budget; cut off at about 545 s from the start, the per-block seconds up to there
#      are in $OUT/sp/metrics.csv).
# The device machine has torch, Lightning and torchmetrics but not dq's other dependencies: put their wheels in .whl/
# first (git-ignored; carry it), e.g.
#   pip download --no-deps -d .whl diffusers==0.42.1 hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 \
#       mlxtend==0.25.0 importlib-metadata zipp
# then run `bash experiments/device_check.sh` there with carry [".whl"]. W&B is not installed there: logger=csv.
cd "$(dirname "$0")/.." || exit 1
rm -rf /tmp/sd /tmp/sp  # bench_scale.py refuses a ROOT that holds a run
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD DQ_CACHE=/tmp/dqcache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, pytorch_lightning as pl, diffusers; print('torch', torch.__version__, 'pl', pl.__version__, 'diffusers', diffusers.__version__)"
echo "== bench_calibration (MNIST default, then paper budget) at ${SECONDS}s"
timeout 70 python3 experiments/bench_calibration.py trainer=gpu 2>&1 | tail -1
timeout 120 python3 experiments/bench_calibration.py trainer=gpu experiment=paper_budget 2>&1 | tail -1
echo "== bench_scale, default budget, at ${SECONDS}s"
timeout 170 python3 experiments/bench_scale.py /tmp/sd trainer=gpu eval.progress=false > "$OUT/scale_default.log" 2>&1
echo "rc $?"; grep -v "kept the block" "$OUT/scale_default.log" | tail -3
left=$((545 - SECONDS))
echo "== bench_scale, paper budget, at ${SECONDS}s, ${left}s left"
if [ "$left" -ge 60 ]; then
    timeout $left python3 experiments/bench_scale.py /tmp/sp trainer=gpu experiment=paper_budget eval.progress=false \
        > "$OUT/scale_paper.log" 2>&1
    echo "rc $?"; grep -v "kept the block" "$OUT/scale_paper.log" | tail -3
else
    echo "skipped: too little time left"
fi
for r in sd sp; do
    mkdir -p "$OUT/$r"
    cp /tmp/$r/run/results.json /tmp/$r/run/checkpoints/last.json /tmp/$r/run/csv/metrics.csv "$OUT/$r/" 2>/dev/null
done
echo "done at ${SECONDS}s"
