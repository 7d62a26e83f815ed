#!/bin/bash
# One of the README's two commands from fresh clones, back to back: two commits, in the order given.
#   bash benchmarks/back_to_back.sh quickstart|tests <repo> <first commit> <second commit> <work folder>
# quickstart: `pip install -q -e . && mlflow run . --env-manager local`, each clone's store empty;
# tests: `pip install -q -e ".[test]" && python -m pytest -n 2` (what .ci/run runs; an old commit may lack it).
# Appends to <work folder>/b2b_<what>.txt each side's start, load average, wall time and peak RSS
# (/usr/bin/time) and exit code; each side's log is <work folder>/b2b_<what>_<commit>.log. Run it
# on an idle machine.
set -u
what=$1; repo=$2; work=$5
case "$what" in
  quickstart) command='pip install -q -e . && mlflow run . --env-manager local' ;;
  tests) command='pip install -q -e ".[test]" && python -m pytest -n 2' ;;
  *) echo "back_to_back.sh: error: the first argument is quickstart or tests, not '$what'" >&2; exit 2 ;;
esac
unset MLFLOW_TRACKING_URI
for rev in "$3" "$4"; do
  clone="$work/b2b_${what}_$rev"
  rm -rf "$clone" && git clone -q "$repo" "$clone" && cd "$clone" && git checkout -q "$rev" || exit 1
  echo "$rev $(git log --oneline -1 | cut -c1-60) start $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)" >> "$work/b2b_$what.txt"
  /usr/bin/time -f "$rev wall %e s, peak RSS %M KB" -a -o "$work/b2b_$what.txt" bash -c "$command" > "$work/b2b_${what}_$rev.log" 2>&1
  echo "$rev rc=$? end $(date -u +%H:%M:%S)" >> "$work/b2b_$what.txt"
done
