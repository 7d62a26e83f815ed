#!/bin/bash
# The README's first command from fresh clones, store empty, back to back: an old commit, then another.
#   bash benchmarks/quickstart_back_to_back.sh <repo> <old commit> <new commit> <work folder>
# Appends to <work folder>/b2b_times.txt: each side's start, load average, wall time and peak RSS
# (/usr/bin/time); each side's log is <work folder>/b2b_<old|new>.log. Run it on an idle machine.
set -u
repo=$1; old=$2; new=$3; work=$4
unset MLFLOW_TRACKING_URI
for pair in "old $old" "new $new"; do
  set -- $pair
  name=$1; rev=$2
  rm -rf "$work/b2b_$name" && git clone -q "$repo" "$work/b2b_$name" && cd "$work/b2b_$name" && git checkout -q "$rev"
  echo "$name $(git log --oneline -1 | cut -c1-60) start $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)" >> "$work/b2b_times.txt"
  /usr/bin/time -f "$name wall %e s, peak RSS %M KB" -a -o "$work/b2b_times.txt" bash -c 'pip install -q -e . && mlflow run . --env-manager local' > "$work/b2b_$name.log" 2>&1
  echo "$name rc=$? end $(date -u +%H:%M:%S)" >> "$work/b2b_times.txt"
done
