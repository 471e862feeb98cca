"""Column names and Arrow schemas of the completion job's input rows and output rows."""

from __future__ import annotations

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
