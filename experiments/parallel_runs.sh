#!/usr/bin/env bash
# Start the runs of a run list, all at once or JOBS at a time, each as `dq-train <its overrides> <common overrides>`,
# and collect a table.
# Meant for one GPU, where dq's small UNets are launch-bound and several processes share the card.
#   bash experiments/parallel_runs.sh SWEEP_ROOT RUN_LIST [overrides for every run, e.g. trainer=gpu]
#   JOBS=4 bash experiments/parallel_runs.sh ...   # at most 4 runs at a time; the next starts as one finishes
# RUN_LIST (experiments/runs/*.txt): one run per line, `name override override ...`; `#` starts a comment.
# Each run goes to SWEEP_ROOT/<name> (log: <name>.log); its results.json is copied to SWEEP_ROOT/<name>.json as it
# finishes, so a cut-off batch keeps what finished; the table SWEEP_ROOT/<list name>.md/.csv is written last.
set -uo pipefail
set -f  # no globbing: overrides such as `a=[1,2]` pass to Hydra as written
here=$(dirname "$0")
root=${1:?usage: parallel_runs.sh SWEEP_ROOT RUN_LIST [overrides]}
list=${2:?usage: parallel_runs.sh SWEEP_ROOT RUN_LIST [overrides]}
shift 2
[ -f "$list" ] || { echo "run list $list not found" >&2; exit 1; }
if ! [[ "${JOBS:-1}" =~ ^[1-9][0-9]*$ ]]; then
  echo "JOBS=$JOBS is invalid: the most runs at a time, a number >= 1" >&2; exit 1
fi
if [ -e "$root" ]; then echo "$root exists: pick a fresh directory (old block checkpoints would be refused)" >&2; exit 1; fi
mkdir -p "$root"
names=() lines=()
declare -A seen=()
while read -r name overrides; do  # read and check the whole list before starting anything
  [ -z "$name" ] && continue
  [ -z "${seen[$name]:-}" ] || { echo "run name $name appears twice in $list" >&2; exit 1; }
  seen[$name]=1 names+=("$name") lines+=("$overrides")
done < <(sed -e 's/#.*//' -e 's/\r$//' "$list")
[ "${#names[@]}" -gt 0 ] || { echo "run list $list holds no runs" >&2; exit 1; }
jobs=${JOBS:-${#names[@]}}
(( jobs > ${#names[@]} )) && jobs=${#names[@]}
# Share the cores: each run gets nproc / jobs intra-op threads (unless OMP_NUM_THREADS is set); PyTorch's default of
# one thread per core in every process oversubscribes the CPU as soon as several runs share it.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / jobs > 0 ? $(nproc) / jobs : 1 ))}
echo "${#names[@]} runs, $jobs at a time, OMP_NUM_THREADS=$OMP_NUM_THREADS each"
failed=0 running=0
for i in "${!names[@]}"; do
  if (( running >= jobs )); then  # wait for any run to finish before starting the next
    wait -n || failed=$((failed + 1))
    running=$((running - 1))
  fi
  name=${names[$i]}
  # shellcheck disable=SC2086  # the overrides are meant to split into words
  ( python3 -m dq.train ${lines[$i]} logger=csv eval.progress=false "$@" hydra.run.dir="$root/$name" \
      > "$root/$name.log" 2>&1 && cp "$root/$name/results.json" "$root/$name.json" ) &
  running=$((running + 1))
done
while (( running > 0 )); do
  wait -n || failed=$((failed + 1))
  running=$((running - 1))
done
python3 "$here/collect.py" "$root" --out "$root/$(basename "$list" .txt)" || failed=$((failed + 1))
[ "$failed" -eq 0 ] || { echo "$failed run(s) or the table failed: see $root/<name>.log" >&2; exit 1; }
