"""The output rows of the completion job (one per input row, with provenance) and how they are committed."""

from __future__ import annotations

import hashlib
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasink

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


# ------------------------------------------------------------------------------------- committed output files
# Output lives under <out>/data/<shard>/, one folder per input shard (its name URL-quoted), so resuming a shard
# reads only that shard's committed row keys, however large the run. Every file is written in one piece
# (object stores replace objects atomically; locally via a rename), so a file that exists is committed.
DATA_DIR = "data"


def shard_dir(out: str, shard_name: str) -> str:
    """The folder holding the committed output rows of input shard ``shard_name``."""
    return f"{out.rstrip('/')}/{DATA_DIR}/{quote(shard_name, safe='')}"


def output_files(storage, out: str) -> list[str]:
    """Every committed output file of the run in ``out``."""
    return storage.glob(f"{out.rstrip('/')}/{DATA_DIR}/*/*.parquet")


def committed_keys(storage, out: str, shard_name: str) -> set[str]:
    """The row keys of input shard ``shard_name`` already committed under ``out`` (a resume skips them)."""
    keys: set[str] = set()
    for f in storage.glob(f"{shard_dir(out, shard_name)}/*.parquet"):
        with storage.open(f) as fh:
            keys.update(pq.read_table(fh, columns=["row_key"]).column("row_key").to_pylist())
    return keys


def count_output_rows(storage, out: str) -> int:
    """Committed output rows, from the parquet footers (no data read)."""
    rows = 0
    for f in output_files(storage, out):
        with storage.open(f) as fh:
            rows += pq.read_metadata(fh).num_rows
    return rows


def read_output(storage, out: str, columns: list[str] | None = None) -> pa.Table:
    """Every committed output row of the run in ``out``."""
    files = output_files(storage, out)
    if not files:
        return pa.table({c: [] for c in (columns or ["row_key"])})
    return pa.concat_tables([pq.read_table(storage.open(f), columns=columns) for f in files],
                            promote_options="default")


def file_name(row_keys: list[str]) -> str:
    """A committed file's name, fixed by the rows it holds: a retried write task rewrites the same file."""
    digest = hashlib.sha1("\n".join(row_keys).encode()).hexdigest()[:20]
    return f"{digest}.parquet"


class OutputSink(Datasink):
    """Ray Data sink of the job's output rows: each block's rows of each input shard become one parquet file
    in that shard's folder, written in one piece, as soon as the block reaches the sink."""

    def __init__(self, out: str, storage_cfg, flow=None):
        self.out, self.storage_cfg, self.flow = out.rstrip("/"), storage_cfg, flow

    def get_name(self) -> str:
        return "CommitOutput"

    def write(self, blocks, ctx) -> int:
        from pipeline.storage import Storage

        storage = Storage(self.storage_cfg)
        written = 0
        for block in blocks:
            table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block)
            if not table.num_rows:
                continue
            shards = table.column("source_shard").to_pylist()
            for name in dict.fromkeys(shards):
                part = table.filter(pa.array([s == name for s in shards]))
                keys = part.column("row_key").to_pylist()
                storage.write_table(part, f"{shard_dir(self.out, name)}/{file_name(keys)}")
                written += part.num_rows
            if self.flow is not None:  # committed: room for the reads again
                self.flow.release.remote(table.num_rows)
        return written
