"""The report's speed and deployed-size columns, read from ``speed`` runs (entrypoints/speed.py).

A speed run times the dense model and the others side by side in one process and logs, per model
run, ``speedup/<run id>`` (median of per-round ``dense_s / model_s``) with ``speedup_low``/
``speedup_high`` (its bootstrap interval), and for the registered (packed) form
``registered_bytes/<run id>`` and ``load_speedup/<run id>`` (pyfunc load time, dense / model).
A model's columns come from the newest FINISHED speed run that measured it. The per-run
``images_per_s`` of ``sample`` runs is that run's own wall clock, taken whenever it ran: it is kept
in results.csv (``<model>_images_per_s``) but not shown as a speed comparison.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pandas as pd

#: Model stage of a row -> the column naming its run.
MODEL_RUN_COLUMNS = {
    "dense": "dense_run_id", "pruned": "prune_run_id", "masked": "train_masks_run_id", "finetuned": "finetune_run_id",
}
#: Which model of a row its deployed size describes: the first of these the row has.
DEPLOYED_ORDER = ("finetuned", "masked", "pruned", "dense")
SPEED_STAGE = "speed"

SPEED_TITLE = "Speed vs dense (side by side: median ratio of dense to model time per DDIM batch, [95% interval])"
SIZE_COLUMNS = [("registered (MiB)", "registered_bytes"), ("registered load vs dense", "registered_load_text")]
#: The columns :func:`add_columns` adds, in order (the last of results.csv).
COLUMNS = [
    *(f"{ms}_speedup{part}" for ms in MODEL_RUN_COLUMNS for part in ("", "_low", "_high", "_text")),
    "speed_kernel", "speed_run_id", "registered_bytes", "registered_load_speedup", "registered_load_text",
]


def _present(value: object) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and value is not pd.NA


def ratio_text(value: float | None, low: float | None, high: float | None) -> str | None:
    """``1.02 [0.97, 1.06]``: a ratio with its interval (None without a ratio)."""
    if value is None:
        return None
    if low is None or high is None:
        return f"{value:.2f}"
    return f"{value:.2f} [{low:.2f}, {high:.2f}]"


def newest_measuring(records: Mapping[str, object], metric: str, run_id: str):
    """The newest speed run (a :class:`maskdm.report.RunRecord`) with ``<metric>/<run_id>``, or None."""
    key = f"{metric}/{run_id}"
    found = [r for r in records.values() if r.stage == SPEED_STAGE and key in r.metrics]
    return max(found, key=lambda r: r.start_time) if found else None


def _ratio(record, metric: str, run_id: str) -> tuple[float | None, float | None, float | None]:
    if record is None:
        return None, None, None
    m = record.metrics
    return m.get(f"{metric}/{run_id}"), m.get(f"{metric}_low/{run_id}"), m.get(f"{metric}_high/{run_id}")


def add_columns(table: pd.DataFrame, records: Mapping[str, object]) -> pd.DataFrame:
    """``table`` (:func:`maskdm.report.build_table`'s) with the speed and registered-size columns."""
    columns: dict[str, list] = {}

    def put(name: str, value) -> None:
        columns.setdefault(name, []).append(value)

    for _, row in table.iterrows():
        used = []
        for ms, id_column in MODEL_RUN_COLUMNS.items():
            run_id = row.get(id_column)
            record = newest_measuring(records, "speedup", run_id) if _present(run_id) else None
            value, low, high = _ratio(record, "speedup", run_id)
            put(f"{ms}_speedup", value)
            put(f"{ms}_speedup_low", low)
            put(f"{ms}_speedup_high", high)
            put(f"{ms}_speedup_text", ratio_text(value, low, high))
            if record is not None:
                used.append(record)
        # The run that timed the row's pruned models (the dense one alone when only it was timed).
        shown = used[-1] if used else None
        put("speed_kernel", shown.params.get("kernel") if shown else None)
        put("speed_run_id", shown.run_id if shown else None)
        deployed = next((row.get(MODEL_RUN_COLUMNS[ms]) for ms in DEPLOYED_ORDER if _present(row.get(MODEL_RUN_COLUMNS[ms]))), None)
        record = newest_measuring(records, "registered_bytes", deployed) if deployed else None
        put("registered_bytes", record.metrics[f"registered_bytes/{deployed}"] if record else None)
        value, low, high = _ratio(record, "load_speedup", deployed)
        put("registered_load_speedup", value)
        put("registered_load_text", ratio_text(value, low, high))
    table = table.copy()
    assert list(columns) == COLUMNS or not len(table)
    for name, values in columns.items():
        table[name] = values
    if not len(table):
        for name in COLUMNS:
            table[name] = pd.Series(dtype=object)
    else:
        table["registered_bytes"] = pd.to_numeric(table["registered_bytes"]).round().astype("Int64")
    return table


def speed_section() -> tuple[str, list[tuple[str, str]]]:
    """(title, [(header, column)]) of results.md's speed table."""
    return SPEED_TITLE, [(ms, f"{ms}_speedup_text") for ms in MODEL_RUN_COLUMNS] + [("kernel", "speed_kernel"), ("speed run", "speed_run_id")]
