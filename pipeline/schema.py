"""Column names and Arrow schemas of the completion job's input rows and output rows."""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa

TASK_OBSERVED = "observed"  # both modalities present: passes through unchanged
TASK_I2T = "i2t"  # image only: generate the text
TASK_T2I = "t2i"  # text only: generate the image
TASK_FAILED = "failed"

STATUS_OBSERVED, STATUS_COMPLETED, STATUS_FAILED = "observed", "completed", "failed"

INPUT_SCHEMA = pa.schema([
    ("row_key", pa.string()),
    ("id", pa.string()),
    ("image", pa.binary()),
    ("image_uri", pa.string()),
    ("text", pa.string()),
    ("source_shard", pa.string()),
    ("task", pa.string()),
    ("error", pa.string()),
])

STAGES = ("embed", "retrieve", "generate")

OUTPUT_SCHEMA = pa.schema([
    ("row_key", pa.string()),
    ("id", pa.string()),
    ("image", pa.binary()),
    ("image_uri", pa.string()),
    ("text", pa.string()),
    ("generated", pa.string()),  # "text", "image" or null
    ("status", pa.string()),  # observed / completed / failed
    ("error", pa.string()),
    ("generator", pa.string()),
    ("retrieved_ids", pa.list_(pa.string())),
    ("fusion_scores", pa.list_(pa.float32())),
    ("candidates", pa.list_(pa.string())),  # text candidates (images are not kept)
    ("candidate_scores", pa.list_(pa.float32())),
    ("chosen", pa.int32()),
    ("kb_version", pa.string()),
    ("config_hash", pa.string()),
    ("source_shard", pa.string()),
    *[(f"seconds_{s}", pa.float32()) for s in STAGES],  # actor-seconds spent on this row per stage
])


def _string_like(schema: pa.Schema) -> set[str]:
    return {f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_binary(f.type)}


# Columns that hold strings or bytes (or null) at every stage of the job.
NULLABLE_OBJECT_COLUMNS = frozenset(_string_like(INPUT_SCHEMA) | _string_like(OUTPUT_SCHEMA))


def restore_nulls(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """String/bytes columns as object arrays with None for null.

    A stage that returns an all-None object column gives Ray Data an Arrow column of type null, which the
    next stage receives as a float NaN array; passed on as is, float and string blocks of that column
    then fail to unify. Every stage calls this on its input (see :func:`numpy_stage`).
    """
    out = dict(batch)
    for name in NULLABLE_OBJECT_COLUMNS.intersection(batch):
        col = batch[name]
        if isinstance(col, np.ndarray) and col.dtype.kind == "f":
            out[name] = np.array([None if v != v else v for v in col.tolist()], dtype=object)
    return out


def numpy_stage(fn):
    """Decorator of a stage's batch function or ``__call__``: its batch (the last positional argument)
    goes through :func:`restore_nulls` first."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args[:-1], restore_nulls(args[-1]), **kwargs)

    return wrapper
