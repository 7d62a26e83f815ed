"""Cached side runs (FID reference statistics, the shapes classifier, latents): every process uses
the one that finished first, so two drivers that both had to make one end up scoring with the same;
and on one machine only one process makes it while the others wait."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from maskdm.tracking import STAGE_TAG, cached_artifact, find_runs, log_side_run

REPO = Path(__file__).resolve().parents[1]


def test_the_first_finished_side_run_is_the_one_everybody_uses(tracking, tmp_path):
    files = []
    for name in ("first", "second"):
        path = tmp_path / name / "stats.txt"
        path.parent.mkdir()
        path.write_text(name)
        files.append(path)
    first = log_side_run("fid_reference", {"maskdm.test_key": "k"}, {}, {}, [files[0]])
    time.sleep(0.05)  # distinct end times
    second = log_side_run("fid_reference", {"maskdm.test_key": "k"}, {}, {}, [files[1]])
    run_id, path = cached_artifact("fid_reference", "maskdm.test_key", "k", "stats.txt")
    assert (run_id, path.read_text()) == (first, "first")
    assert second != first
    assert cached_artifact("fid_reference", "maskdm.test_key", "other", "stats.txt") is None


#: One process of the race: it says it has arrived, then asks for the cache. Its maker waits until
#: both have arrived, so without a lock the other would find no cache and make its own.
RACER = """
import sys, time
from pathlib import Path
import mlflow
from maskdm.tracking import SideRun, cached_or_made

uri, folder, name = sys.argv[1:4]
folder = Path(folder)
mlflow.set_tracking_uri(uri)

def make(work):
    with open(folder / "made.txt", "a") as f:
        f.write(name + "\\n")
    deadline = time.monotonic() + 120
    while len(list(folder.glob("arrived-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1)  # the other process is past its first look for the cache by now
    (work / "stats.txt").write_text(name)
    return SideRun({}, {}, [work / "stats.txt"])

(folder / f"arrived-{name}").touch()
run_id, path = cached_or_made("fid_reference", "maskdm.test_key", "race", "stats.txt", make)
print(run_id, path.read_text())
"""


def test_two_processes_at_once_make_the_cache_once(tracking, tmp_path):
    assert find_runs("fid_reference") == []  # (and the store's tables exist before the two start)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    racers = [
        subprocess.Popen([sys.executable, "-c", RACER, tracking, str(tmp_path), name], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name in ("a", "b")
    ]
    outputs = [racer.communicate(timeout=300) for racer in racers]
    assert all(racer.returncode == 0 for racer in racers), [err[-2000:] for _, err in outputs]
    assert (tmp_path / "arrived-a").exists() and (tmp_path / "arrived-b").exists()
    made = (tmp_path / "made.txt").read_text().split()
    assert len(made) == 1, made
    (answer,) = {out.strip() for out, _ in outputs}  # both: the same run, the same file
    (run,) = find_runs("fid_reference", {"maskdm.test_key": "race"})
    assert run.data.tags[STAGE_TAG] == "fid_reference"
    assert answer == f"{run.info.run_id} {made[0]}"
