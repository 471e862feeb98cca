"""The output rows of the completion job: one per input row, with provenance."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.schema import (
    OUTPUT_SCHEMA,
    STAGES,
    STATUS_COMPLETED,
    STATUS_FAILED,
    STATUS_OBSERVED,
    TASK_FAILED,
    TASK_OBSERVED,
)


def _missing(v) -> bool:
    return v is None or (isinstance(v, (float, np.floating)) and np.isnan(v))


def _column(batch: dict, name: str, n: int, default=None) -> list:
    """The column as Python values; nulls (which numpy batches may carry as NaN) become ``default``."""
    if name not in batch:
        return [default] * n
    return [default if _missing(v) else v for v in batch[name]]


def _floats(values) -> list | None:
    return None if values is None else [float(v) for v in values]


def finalize(batch: dict[str, np.ndarray], *, kb_version: str, config_hash: str) -> pa.Table:
    """Output rows (``OUTPUT_SCHEMA``) from a batch of any branch: observed, completed or failed."""
    n = len(batch["row_key"])
    task = _column(batch, "task", n)
    status = _column(batch, "status", n)
    error = _column(batch, "error", n, "")
    for i in range(n):
        if task[i] == TASK_FAILED:
            status[i] = STATUS_FAILED
        elif task[i] == TASK_OBSERVED:
            status[i] = STATUS_OBSERVED
        elif status[i] is None:
            status[i], error[i] = STATUS_FAILED, error[i] or f"row left the {task[i]} branch unprocessed"
    generated = _column(batch, "generated", n)
    data = {
        "row_key": _column(batch, "row_key", n),
        "id": _column(batch, "id", n),
        "image": [None if v is None or len(v) == 0 else bytes(v) for v in _column(batch, "image", n)],
        "image_uri": _column(batch, "image_uri", n),
        "text": _column(batch, "text", n),
        "generated": [g if s == STATUS_COMPLETED else None for g, s in zip(generated, status)],
        "status": status,
        "error": [e or None for e in error],
        "generator": _column(batch, "generator", n),
        "retrieved_ids": [None if v is None else [str(x) for x in v] for v in _column(batch, "retrieved_ids", n)],
        "fusion_scores": [_floats(v) for v in _column(batch, "fusion_scores", n)],
        "candidates": [None if v is None else list(v) for v in _column(batch, "candidates", n)],
        "candidate_ids": [None if v is None else [str(x) for x in v] for v in _column(batch, "candidate_ids", n)],
        "candidate_scores": [_floats(v) for v in _column(batch, "candidate_scores", n)],
        "chosen": [None if c is None or c < 0 else int(c) for c in _column(batch, "chosen", n, -1)],
        "settings": _column(batch, "settings", n),
        "kb_version": [kb_version] * n,
        "config_hash": [config_hash] * n,
        "source_shard": _column(batch, "source_shard", n),
    }
    for s in STAGES:
        data[f"seconds_{s}"] = [float(v) for v in _column(batch, f"seconds_{s}", n, 0.0)]
    return pa.table(data, schema=OUTPUT_SCHEMA)
