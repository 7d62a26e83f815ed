"""Sparsity patterns by name: ``unstructured`` or ``N:M`` (N weights kept of every M).

Without torch: the driver checks a sweep's pattern before any stage runs, and never imports torch.
"""

from __future__ import annotations

import re

from maskdm.errors import MaskDMError

UNSTRUCTURED = "unstructured"

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"2:4"`` -> ``(2, 4)``. Needs integers ``1 <= N < M``."""
    text = str(pattern).strip()
    if text.lower() == UNSTRUCTURED:
        return None
    match = _NM_RE.match(text)
    if match:
        n, m = int(match.group(1)), int(match.group(2))
        if 1 <= n < m:
            return n, m
    raise MaskDMError(
        f"pattern '{pattern}' is not valid: use 'unstructured' or 'N:M' with integers 1 <= N < M "
        "(N weights kept of every M, e.g. '2:4')"
    )


def pattern_ratio(pattern: str) -> float | None:
    """The pruning ratio an ``N:M`` pattern implies (``1 - N/M``); None for ``unstructured``."""
    nm = parse_pattern(pattern)
    return None if nm is None else 1.0 - nm[0] / nm[1]
