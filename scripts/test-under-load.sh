#!/usr/bin/env bash
# Runs the whole suite (scripts/test.sh) N times in a row (default 3) while a CPU-heavy process
# (one busy core, at normal priority) runs beside it, and stops at the first failure: a test that
# fails only under load is a defect, not noise. Prints each run's time and the result.
#
#   scripts/test-under-load.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}

# The load: one shell spinning, as a noisy neighbour on a hypervisor would.
sh -c 'while :; do :; done' &
hog=$!
trap 'kill $hog 2>/dev/null || true' EXIT

for i in $(seq "$runs"); do
  start=$SECONDS
  echo "test-under-load: run $i of $runs (busy neighbour pid $hog)"
  if ! scripts/test.sh; then
    echo "test-under-load: run $i FAILED after $((SECONDS - start)) s" >&2
    exit 1
  fi
  echo "test-under-load: run $i passed in $((SECONDS - start)) s"
done
echo "test-under-load: $runs runs passed in a row under load"
