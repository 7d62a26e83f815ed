"""A module the warm server's tests preload after the server is ready (``ready_after``).

Importing it writes ``$WARM_LATER_GO.importing``, then waits until ``$WARM_LATER_GO`` exists, so a
test knows the server is inside this import and decides when it ends. With ``WARM_LATER_CUDA=1`` it
makes torch report CUDA as initialised, as a module that started CUDA would.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_go = Path(os.environ["WARM_LATER_GO"])
Path(f"{_go}.importing").write_text("")
_deadline = time.monotonic() + 120
while not _go.exists() and time.monotonic() < _deadline:
    time.sleep(0.01)

if os.environ.get("WARM_LATER_CUDA") == "1":
    import torch

    torch.cuda.is_initialized = lambda: True
