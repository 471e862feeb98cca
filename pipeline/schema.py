"""Column names and Arrow schemas of the completion job's input rows and output rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

TASK_OBSERVED = "observed"  # both modalities present: passes through unchanged
TASK_I2T = "i2t"  # image only: generate the text
TASK_T2I = "t2i"  # text only: generate the image
TASK_FAILED = "failed"

STATUS_OBSERVED, STATUS_COMPLETED, STATUS_FAILED = "observed", "completed", "failed"
STATUS_ABSTAINED = "abstained"  # completed below JobConfig.min_confidence: the completion stays in the provenance

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
RETRIES = "retries"  # times a row's batch was retried after a transient error, all stages together

OUTPUT_SCHEMA = pa.schema([
    ("row_key", pa.string()),
    ("id", pa.string()),
    ("image", pa.binary()),
    ("image_uri", pa.string()),
    ("text", pa.string()),
    ("generated", pa.string()),  # "text", "image" or null
    ("status", pa.string()),  # observed / completed / abstained / failed
    ("error", pa.string()),
    ("generator", pa.string()),
    ("retrieved_ids", pa.list_(pa.string())),
    ("fusion_scores", pa.list_(pa.float32())),
    ("candidates", pa.list_(pa.string())),  # text candidates (images are not kept)
    ("candidate_ids", pa.list_(pa.string())),  # the KB entry behind each candidate (nearest-neighbour generators)
    ("candidate_scores", pa.list_(pa.float32())),
    ("chosen", pa.int32()),
    ("confidence", pa.float32()),  # P(the completion is faithful), the KB's calibrated model; null: no model
    ("settings", pa.string()),  # JSON: the retrieval and selection settings used, and their source
    ("skipped_examples", pa.list_(pa.string())),  # "<entry id>: <why>" of examples whose image could not be had
    ("kb_version", pa.string()),
    ("config_hash", pa.string()),
    ("source_shard", pa.string()),
    (RETRIES, pa.int32()),
    *[(f"seconds_{s}", pa.float32()) for s in STAGES],  # actor-seconds spent on this row per stage
])


def _fixed(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_binary(t) or pa.types.is_list(t)


# Columns whose Arrow type the schemas fix (strings, bytes, lists). Left to inference, a numpy batch's
# column changes type with its content: all None becomes type null (handed to the next stage as float
# NaN), equal-length lists become a tensor; blocks of one column with two types then fail to combine.
TYPED_COLUMNS: dict[str, pa.DataType] = {f.name: f.type for f in (*INPUT_SCHEMA, *OUTPUT_SCHEMA) if _fixed(f.type)}


def _value(v):
    if v is None or (isinstance(v, (float, np.floating)) and v != v):
        return None
    return v.tolist() if isinstance(v, np.ndarray) else v


def restore_nulls(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The schema's string, bytes and list columns as object arrays of Python values, None for null
    (an all-null column reaches a stage as float NaN, a column of equal-length lists as a 2-D array)."""
    out = dict(batch)
    for name in TYPED_COLUMNS.keys() & batch.keys():
        col = batch[name]
        if isinstance(col, np.ndarray) and (col.dtype.kind == "f" or col.ndim > 1):
            values = [_value(v) for v in col]
            out[name] = np.empty(len(values), dtype=object)
            out[name][:] = values
    return out


def typed_block(batch: dict[str, np.ndarray]) -> pa.Table:
    """A stage's output as an Arrow table: the schema's string, bytes and list columns with their declared
    types, every other column (numbers, embeddings) as Ray Data converts numpy batches."""
    from ray.data.block import BlockAccessor

    rest = {k: v for k, v in batch.items() if k not in TYPED_COLUMNS}
    inferred = BlockAccessor.batch_to_block(rest) if rest else None
    columns = {}
    for name, col in batch.items():
        if name in TYPED_COLUMNS:
            columns[name] = pa.array([_value(v) for v in col], type=TYPED_COLUMNS[name])
        else:
            columns[name] = inferred.column(name)
    return pa.table(columns)
