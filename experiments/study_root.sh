# Sourced by the study scripts: `source "$(dirname "$0")/study_root.sh" NAME "${1:-}"`.
# Sets `root` to the given directory (or multirun/NAME_<date-time>) as an absolute path and creates it, refusing
# one that exists (the runs would find old block checkpoints of another configuration and be refused); moves to the
# checkout's root, where the scripts' `experiments/...` paths point; one intra-op thread per run, so two one-thread
# streams share the 2 cores and their train_s compare.
root=$(realpath -m "${2:-multirun/$1_$(date +%Y-%m-%d_%H-%M-%S)}")
if [ -e "$root" ]; then
  echo "$root exists: pick a fresh directory (old block checkpoints would be refused)" >&2
  exit 1
fi
mkdir -p "$root"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OMP_NUM_THREADS=1
