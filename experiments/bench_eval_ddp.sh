#!/bin/bash
# dq-eval trainer=ddp against one process, on this machine's CPUs: the min-max PTQ W4A8 student of the embedded teacher
# and the teacher itself, each sampled on 1,000 noises (the teacher-sample cache off, so both are timed), in one
# process of two threads, then in two processes of one thread (gloo), each sampling half of the batches.
# Prints each run's processes, sampling seconds of teacher and student, FID and PSNR.
#   bash experiments/bench_eval_ddp.sh ROOT [overrides...]   # a fresh ROOT: runs in ROOT/one, ROOT/two (about 2 min)
[ -n "${1:-}" ] || { echo "usage: bash experiments/bench_eval_ddp.sh ROOT [overrides...]" >&2; exit 2; }
source "$(dirname "$0")/study_root.sh" bench_eval_ddp "$1"  # a fresh ROOT; moves to the checkout
shift
common=(quantizer=ptq_minmax bits=w4a8 eval.cache_teacher_samples=false logger=csv eval.progress=false "$@")
OMP_NUM_THREADS=2 python -m dq.eval "${common[@]}" "hydra.run.dir=$root/one" > "$root/one.log" 2>&1 || exit 1
OMP_NUM_THREADS=1 python -m dq.eval "${common[@]}" trainer=ddp trainer.accelerator=cpu trainer.devices=2 device=cpu \
    "hydra.run.dir=$root/two" > "$root/two.log" 2>&1 || exit 1
python - "$root" <<'PY'
import json, sys
from pathlib import Path
print("| processes x threads | teacher sample s | student sample s | student FID | PSNR dB |")
print("|---|---|---|---|---|")
for name in ("one", "two"):
    r = json.loads((Path(sys.argv[1]) / name / "results.json").read_text())
    t, s = r["teacher"], r["student"]
    shape = f"{r['cost'].get('processes', 1)} x {r['provenance']['threads']}"
    print(f"| {shape} | {t['sample_s']:.1f} | {s['sample_s']:.1f} | {s['fid']:.2f} | {s['psnr_to_teacher']:.2f} |")
PY
