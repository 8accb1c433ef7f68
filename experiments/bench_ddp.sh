#!/bin/bash
# trainer=ddp against one process, on this machine's CPUs: dq-train's defaults (DilateQuant W4A8) in one process with
# two threads, then as two processes of one thread each (trainer=ddp, gloo), each owning half the calibration samples.
# Prints collect.py's table of the two runs: training seconds, the first process's peak memory, FID, PSNR.
#   bash experiments/bench_ddp.sh ROOT [overrides...]   # a fresh ROOT: runs in ROOT/one, ROOT/two (about 6 minutes)
[ -n "${1:-}" ] || { echo "usage: bash experiments/bench_ddp.sh ROOT [overrides...]" >&2; exit 2; }
source "$(dirname "$0")/study_root.sh" bench_ddp "$1"  # a fresh ROOT; moves to the checkout
shift
common=(logger=csv eval.progress=false trainer.enable_progress_bar=false "$@")
OMP_NUM_THREADS=2 python -m dq.train "${common[@]}" "hydra.run.dir=$root/one" > "$root/one.log" 2>&1 || exit 1
OMP_NUM_THREADS=1 python -m dq.train "${common[@]}" trainer=ddp trainer.accelerator=cpu trainer.devices=2 device=cpu \
    "hydra.run.dir=$root/two" > "$root/two.log" 2>&1 || exit 1
python experiments/collect.py "$root"  # threads in `code`, the processes in `overrides`
