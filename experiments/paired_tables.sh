# Sourced (after `set -euo pipefail`) by the scripts that make a paired table from the committed run tables
# (baselines_table.sh, qat_lsq_symmetric_table.sh, adaround_paper_budget_table.sh): moves to the repository root and
# sets `t` (experiments/tables) and `tmp` (a scratch directory, removed on exit), where `keep` copies rows.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
t=experiments/tables
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
keep() {  # keep <table> <grep -E pattern>: the header and the rows that match, into $tmp/<table>.csv
  { head -n 1 "$t/$1.csv"; tail -n +2 "$t/$1.csv" | grep -E "$2"; } > "$tmp/$1.csv" \
    || { echo "$t/$1.csv holds no rows matching '$2'" >&2; exit 1; }
}
