"""A Ray Data datasource over the input shards (parquet, JSONL, WebDataset tars; local or s3://).

One read task per shard, yielding blocks of ``block_rows`` rows. Each row gets a ``row_key`` unique across
the whole input (shard path + row number), so duplicate user ids stay distinct rows, and its ``task`` (which
modality is missing, ``rag4dmc.actors.preprocess.route_row``) is decided here, from what the row holds, so each
direction's rows flow down their own branch of the job. A shard or tar member that cannot be read becomes
one failed row whose error names it: every problem in the input is accounted for in the output.

Resume: a read task asks ``committed(shard_name)`` for the row keys of its shard already in the output
and skips them (``rag4dmc.pipeline.job.writer.committed_keys``: one shard's folder, never the whole run's).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import pyarrow as pa
from ray.data import ReadTask
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource

from rag4dmc.actors.preprocess import route_row
from rag4dmc.pipeline.config import ColumnsConfig
from rag4dmc.pipeline.io import datasets
from rag4dmc.pipeline.schema import INPUT_SCHEMA, TASK_FAILED

ROW_KEY = "row_key"


def row_key(shard: str, row: int | str) -> str:
    """The key of a row of input shard ``shard`` (a row number, or ``error:<i>`` for a part it could not read):
    unique across the input and stable across runs, so a resumed run knows the rows it has."""
    return f"{shard}:{row}"


def committed_keys(files: Iterable[str], read_keys: Callable[[str], Iterable[str]], shard: str) -> set[str]:
    """The keys of input shard ``shard``'s rows found in committed ``files`` (each read by ``read_keys``): the rows a
    resumed read of that shard skips. The one resume rule of both jobs (``complete``'s output files,
    ``kb build``'s embedding layout): a row is done once its key is in a committed file."""
    prefix = row_key(shard, "")
    return {k for f in files for k in read_keys(f) if k.startswith(prefix)}


def shard_name(shard: str, root: str) -> str:
    """A shard's name within the input (its path below ``root``; its file name when the input is one file): the
    prefix of its rows' keys and the name of its output folder."""
    rel = shard[len(root):].lstrip("/") if shard.startswith(root) else shard
    return rel or shard.rstrip("/").rsplit("/", 1)[-1]


def routed(table: pa.Table) -> tuple[pa.Array, pa.Array, pa.Array]:
    """(task, text, error) columns of canonical rows: what each row misses (rows failed at read keep theirs)."""
    tasks, texts, errors = [], [], []
    for image, uri, text, err in zip(table.column("image").to_pylist(), table.column("image_uri").to_pylist(),
                                     table.column("text").to_pylist(), table.column("input_error").to_pylist()):
        if err is not None:
            tasks.append(TASK_FAILED), texts.append(text), errors.append(err)
            continue
        task, clean, error = route_row(image, uri, text)
        tasks.append(task), texts.append(clean if clean is not None else None), errors.append(error or "")
    return pa.array(tasks, pa.string()), pa.array(texts, pa.string()), pa.array(errors, pa.string())


def keyed_rows(shard: str, result: datasets.ShardResult, root: str) -> pa.Table:
    """The shard's canonical rows plus ``row_key``/``task``/``error`` columns, and a failed row per read error."""
    name = shard_name(shard, root)
    table = result.table
    n = table.num_rows
    task, text, error = routed(table)
    rows = {
        ROW_KEY: pa.array([row_key(name, i) for i in range(n)], pa.string()),
        "id": table.column("id").cast(pa.string()),
        "image": table.column("image").cast(pa.binary()),
        "image_uri": table.column("image_uri").cast(pa.string()),
        "text": text,
        "source_shard": pa.array([name] * n, pa.string()),
        "task": task,
        "error": error,
    }
    out = pa.table(rows, schema=INPUT_SCHEMA)
    if result.errors:
        errs = {
            ROW_KEY: [row_key(name, f"error:{i}") for i in range(len(result.errors))],
            "id": [row_key(name, f"error:{i}") for i in range(len(result.errors))],
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
                 shards: list[str] | None = None, keys: set[str] | None = None,
                 tasks: tuple[str, ...] | None = None, block_rows: int = 256,
                 committed: Callable[[str], set[str]] | None = None, name: str = "ReadShards", flow=None):
        super().__init__()
        self.keys = keys  # only these row keys (a retry of failed rows)
        self.tasks = tasks  # only rows routed to these tasks (one branch of the job); None: every row
        self.committed = committed  # shard name -> its row keys already in the output (skipped)
        self.root = path.rstrip("/")
        self.columns, self.storage_options, self.fmt = columns, storage_options, fmt
        self.block_rows, self.name = block_rows, name
        self.flow = flow  # a rag4dmc.pipeline.job.in_flight.InFlight actor: room is asked for before a read yields its rows
        self.shards = shards if shards is not None else datasets.list_shards(path, storage_options, fmt)

    def get_name(self) -> str:
        return self.name

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        tasks = []
        for shard in self.shards:
            def read(shard=shard):
                result = datasets.read_shard(shard, self.columns, self.storage_options, self.fmt)
                yield from self.blocks(keyed_rows(shard, result, self.root), shard_name(shard, self.root))

            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=(shard,), exec_stats=None)
            tasks.append(ReadTask(read, meta, schema=INPUT_SCHEMA))
        return tasks

    def blocks(self, rows: pa.Table, name: str):
        """The rows this read keeps (its tasks, the retried keys, not yet committed) in blocks of block_rows."""
        keep = np.ones(rows.num_rows, bool)
        if self.tasks is not None:
            keep &= np.isin(np.asarray(rows.column("task").to_pylist(), dtype=object), self.tasks)
        skip = set(self.committed(name)) if self.committed is not None else set()
        if self.keys is not None or skip:
            keys = rows.column(ROW_KEY).to_pylist()
            keep &= np.array([(self.keys is None or k in self.keys) and k not in skip for k in keys], bool)
        rows = rows.filter(pa.array(keep))
        if self.flow is not None and rows.num_rows:
            import ray

            # Room for the whole read at once: Ray Data hands a read task's output on when the task ends.
            ray.get(self.flow.acquire.remote(rows.num_rows))
        for start in range(0, rows.num_rows, self.block_rows):
            yield rows.slice(start, self.block_rows)
