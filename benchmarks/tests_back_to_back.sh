#!/bin/bash
# The README's test command from fresh clones, back to back: a new commit (its .ci/run), then an old one.
#   bash benchmarks/tests_back_to_back.sh <repo> <new commit> <old commit> <work folder>
# Appends to <work folder>/b2b_tests.txt each side's start, load average, wall time (/usr/bin/time)
# and exit code; each side's log is <work folder>/tests_<new|old>.log. Run it on an idle machine.
set -u
repo=$1; new=$2; old=$3; work=$4
unset MLFLOW_TRACKING_URI
for pair in "new $new" "old $old"; do
  set -- $pair
  name=$1; rev=$2
  rm -rf "$work/tests_$name" && git clone -q "$repo" "$work/tests_$name" && cd "$work/tests_$name" && git checkout -q "$rev"
  echo "$name $(git log --oneline -1 | cut -c1-60) start $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)" >> "$work/b2b_tests.txt"
  # The old commit may predate .ci/run: the README's test command itself.
  /usr/bin/time -f "$name wall %e s" -a -o "$work/b2b_tests.txt" bash -c 'pip install -q -e ".[test]" && python -m pytest -n 2' > "$work/tests_$name.log" 2>&1
  echo "$name rc=$? end $(date -u +%H:%M:%S)" >> "$work/b2b_tests.txt"
done
