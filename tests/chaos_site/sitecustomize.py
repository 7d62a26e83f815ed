"""Test-only fault injection for the chaos test (tests/test_driver.py), never on a user's path.

Python imports this module at start-up only when tests/chaos_site is on PYTHONPATH, which only the
chaos test puts there. With ``MASKDM_CHAOS_STOP`` set, a process freezes itself (SIGSTOP) at one
exact moment of a finetune's checkpoint handling, found through Python's audit events (no hook in
MaskDM's code); the test sees the stopped process (psutil) and SIGKILLs it with its driver:

- ``upload:<checkpoint folder>``: as the second file of that checkpoint is published in the
  artifact store (one file there, ``ema.json`` not yet): mid-upload;
- ``rotation:<checkpoint folder>``: as that (older) checkpoint's folder is about to be deleted,
  its ``ema.json`` already gone: mid-rotation.
"""

import os
import signal
import sys

_SPEC = os.environ.get("MASKDM_CHAOS_STOP", "")

if _SPEC:
    _KIND, _, _TARGET = _SPEC.partition(":")
    _published = [0]

    def _freeze() -> None:
        os.kill(os.getpid(), signal.SIGSTOP)

    def _hook(event: str, args: tuple) -> None:
        if _KIND == "upload" and event in ("os.rename", "os.replace") and len(args) > 1:
            # In the artifact store (a local store's <run>/artifacts/), not the stage's own
            # checkpoint folder, whose files are also written by renames.
            if f"/artifacts/checkpoints/{_TARGET}/" in str(args[1]).replace(os.sep, "/"):
                _published[0] += 1
                if _published[0] == 2:
                    _freeze()
        elif _KIND == "rotation" and event == "shutil.rmtree" and args:
            if str(args[0]).replace(os.sep, "/").rstrip("/").endswith(f"/artifacts/checkpoints/{_TARGET}"):
                _freeze()

    sys.addaudithook(_hook)
