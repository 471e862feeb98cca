"""``rag4dmc verify``: is every input row in the output exactly once, and does the output belong to its run?

What the README promises after any crash, checked from the outside: the input's row keys (its shards' row counts:
parquet footers, or a read of the shard for other formats; a shard that cannot be read owes its error rows) against
the output's keys and statuses (no image is read), the output's ``kb_version`` and ``config_hash`` against
``run.json``, and whether a ``--retry-failed`` swap was left half done (``rag4dmc.pipeline.job.retry_swap``).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field

import pyarrow.parquet as pq

from rag4dmc.pipeline.config import ColumnsConfig
from rag4dmc.pipeline.io import datasets
from rag4dmc.pipeline.io.storage import Storage, url_to_fs
from rag4dmc.pipeline.job.reader import row_key, shard_name
from rag4dmc.pipeline.job.retry_swap import swap_state
from rag4dmc.pipeline.job.runner import RUN_FILE
from rag4dmc.pipeline.job.writer import read_output

SAMPLE = 10  # keys listed per problem in the report (the counts are whole)


@dataclass
class Verification:
    """What ``verify`` found; ``ok`` when nothing is wrong."""

    input_rows: int = 0
    output_rows: int = 0
    statuses: dict = field(default_factory=dict)
    lost: int = 0
    duplicated: int = 0
    unexpected: int = 0  # output rows whose key no input row has (another input's output, or a foreign file)
    lost_keys: list = field(default_factory=list)
    duplicated_keys: list = field(default_factory=list)
    unexpected_keys: list = field(default_factory=list)
    unfinished_swap: str | None = None
    run_mismatch: list = field(default_factory=list)  # "kb_version: 3 rows have X, run.json has Y", ...
    problems: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def input_keys(data: str, storage: Storage, data_format: str = "auto",
               columns: ColumnsConfig | None = None) -> set[str]:
    """The row keys the job owes for ``data``: each shard's rows, and an error row per part it cannot read."""
    root = data.rstrip("/")
    keys: set[str] = set()
    for shard in datasets.list_shards(data, storage.options, data_format):
        name = shard_name(shard, root)
        fmt = datasets.detect_format(shard) if data_format == "auto" else data_format
        if fmt == "parquet":
            try:
                fs, path = url_to_fs(shard, storage.options)
                with fs.open(path, "rb") as fh:
                    keys.update(row_key(name, i) for i in range(pq.ParquetFile(fh).metadata.num_rows))
                continue
            except Exception:  # noqa: BLE001 - an unreadable footer: the full read says what the job saw
                pass
        result = datasets.read_shard(shard, columns or ColumnsConfig(), storage.options, data_format)
        keys.update(row_key(name, i) for i in range(result.table.num_rows))
        keys.update(row_key(name, f"error:{i}") for i in range(len(result.errors)))
    return keys


def verify(data: str, out: str, storage: Storage, data_format: str = "auto",
           columns: ColumnsConfig | None = None) -> Verification:
    """Check the output in ``out`` of the input ``data`` (reads keys, statuses and run identities only)."""
    out = out.rstrip("/")
    v = Verification()
    v.unfinished_swap = swap_state(storage, out)
    if v.unfinished_swap:
        v.problems.append(f"a --retry-failed swap was left unfinished ({v.unfinished_swap}): run the same "
                          "`rag4dmc complete` command again, which completes it first")
    expected = input_keys(data, storage, data_format, columns)
    v.input_rows = len(expected)
    run = json.loads(storage.read_bytes(f"{out}/{RUN_FILE}")) if storage.exists(f"{out}/{RUN_FILE}") else None
    table = read_output(storage, out, ["row_key", "status", "kb_version", "config_hash"])
    keys = table.column("row_key").to_pylist()
    v.output_rows = len(keys)
    v.statuses = dict(Counter(table.column("status").to_pylist()))
    counts = Counter(keys)
    lost = sorted(expected - counts.keys())
    duplicated = sorted(k for k, n in counts.items() if n > 1)
    unexpected = sorted(counts.keys() - expected)
    v.lost, v.duplicated, v.unexpected = len(lost), len(duplicated), len(unexpected)
    v.lost_keys, v.duplicated_keys, v.unexpected_keys = lost[:SAMPLE], duplicated[:SAMPLE], unexpected[:SAMPLE]
    if lost:
        v.problems.append(f"{len(lost)} input rows are not in the output (e.g. {lost[0]}): run the same "
                          "`rag4dmc complete` command again; it computes only the missing rows")
    if duplicated:
        v.problems.append(f"{len(duplicated)} rows are in the output more than once (e.g. {duplicated[0]})")
    if unexpected:
        v.problems.append(f"{len(unexpected)} output rows match no input row (e.g. {unexpected[0]}): is --data the "
                          "input this output was made from?")
    if run is None:
        v.problems.append(f"{out}/{RUN_FILE} is missing: this is not the output folder of a `rag4dmc complete` run")
    else:
        for column in ("kb_version", "config_hash"):
            other = Counter(x for x in table.column(column).to_pylist() if x != run.get(column))
            if other:
                v.run_mismatch.append(f"{column}: {sum(other.values())} rows have {sorted(other)[:3]}, "
                                      f"{RUN_FILE} has {run.get(column)!r}")
        v.problems += [f"rows from another run: {m}" for m in v.run_mismatch]
    return v
