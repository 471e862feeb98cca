"""A Ray Data datasource over the input shards (parquet, JSONL, WebDataset tars; local or s3://).

One read task per shard. Each row gets a ``row_key`` unique across the whole input (shard path +
row number), which Ray Data's checkpointing uses as its id column, so duplicate user ids stay distinct
rows. A shard or tar member that cannot be read becomes one failed row whose error names it: every
problem in the input is accounted for in the output.
"""

from __future__ import annotations

import pyarrow as pa
from ray.data import ReadTask
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource

from pipeline import datasets
from pipeline.config import ColumnsConfig
from pipeline.schema import INPUT_SCHEMA, TASK_FAILED

ROW_KEY = "row_key"


def keyed_rows(shard: str, result: datasets.ShardResult, root: str) -> pa.Table:
    """The shard's canonical rows plus ``row_key``/``task``/``error`` columns, and a failed row per read error."""
    name = shard[len(root):].lstrip("/") if shard.startswith(root) else shard
    table = result.table
    n = table.num_rows
    rows = {
        ROW_KEY: pa.array([f"{name}:{i}" for i in range(n)], pa.string()),
        "id": table.column("id").cast(pa.string()),
        "image": table.column("image").cast(pa.binary()),
        "image_uri": table.column("image_uri").cast(pa.string()),
        "text": table.column("text").cast(pa.string()),
        "source_shard": pa.array([name] * n, pa.string()),
        "task": pa.array([None if e is None else TASK_FAILED for e in table.column("input_error").to_pylist()],
                         pa.string()),
        "error": pa.array([e or "" for e in table.column("input_error").to_pylist()], pa.string()),
    }
    out = pa.table(rows, schema=INPUT_SCHEMA)
    if result.errors:
        errs = {
            ROW_KEY: [f"{name}:error:{i}" for i in range(len(result.errors))],
            "id": [f"{name}:error:{i}" for i in range(len(result.errors))],
            "image": [None] * len(result.errors),
            "image_uri": [None] * len(result.errors),
            "text": [None] * len(result.errors),
            "source_shard": [name] * len(result.errors),
            "task": [TASK_FAILED] * len(result.errors),
            "error": [f"unreadable input: {e}" for e in result.errors],
        }
        out = pa.concat_tables([out, pa.table(errs, schema=INPUT_SCHEMA)])
    return out


class ShardDatasource(Datasource):
    """Reads the canonical sample schema from every shard under ``path``."""

    def __init__(self, path: str, columns: ColumnsConfig, storage_options: dict, fmt: str = "auto",
                 shards: list[str] | None = None, keys: set[str] | None = None):
        super().__init__()
        self.keys = keys  # only these row keys (a retry of failed rows)
        self.root = path.rstrip("/")
        self.columns, self.storage_options, self.fmt = columns, storage_options, fmt
        self.shards = shards if shards is not None else datasets.list_shards(path, storage_options, fmt)

    def get_name(self) -> str:
        return "ReadShards"

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        tasks = []
        for shard in self.shards:
            def read(shard=shard):
                result = datasets.read_shard(shard, self.columns, self.storage_options, self.fmt)
                rows = keyed_rows(shard, result, self.root)
                if self.keys is not None:
                    rows = rows.filter(pa.array([k in self.keys for k in rows.column(ROW_KEY).to_pylist()]))
                yield rows

            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=(shard,), exec_stats=None)
            tasks.append(ReadTask(read, meta, schema=INPUT_SCHEMA))
        return tasks
