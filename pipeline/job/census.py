"""How the input's rows split over the job's directions, estimated from a few shards before anything starts.

The job sizes each direction's pools by its share of the rows (``rag4dmc.pipeline.job.scaling``), and ``--dry-run`` prints
the rows per direction. Reading every shard on the driver would cost as much as the job's reads, so a census
reads ``JobConfig.census_shards`` shards spread evenly over the input, routes their rows as the job's reads do
(``rag4dmc.pipeline.job.reader.routed``) and scales the counts to the number of shards.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from rag4dmc.pipeline.config import ColumnsConfig
from rag4dmc.pipeline.io import datasets
from rag4dmc.pipeline.job.reader import routed
from rag4dmc.pipeline.schema import TASK_FAILED, TASK_I2T, TASK_OBSERVED, TASK_T2I

TASKS = (TASK_I2T, TASK_T2I, TASK_OBSERVED, TASK_FAILED)


@dataclass(frozen=True)
class Census:
    """Rows per task (``i2t``, ``t2i``, ``observed``, ``failed``) in the shards read, and the scale to the whole
    input (``shards`` / ``shards_read``); exact when every shard was read."""

    counted: dict[str, int] = field(default_factory=dict)
    shards: int = 0
    shards_read: int = 0

    @property
    def exact(self) -> bool:
        return self.shards_read == self.shards

    def rows(self, task: str | None = None) -> int:
        """Estimated rows of ``task`` (all rows if None) in the whole input."""
        n = sum(self.counted.values()) if task is None else self.counted.get(task, 0)
        return round(n * self.shards / self.shards_read) if self.shards_read else 0

    def share(self, task: str) -> float:
        """The share of the rows to complete (i2t + t2i) that ``task`` holds; half each when none was seen."""
        todo = self.counted.get(TASK_I2T, 0) + self.counted.get(TASK_T2I, 0)
        return self.counted.get(task, 0) / todo if todo else 0.5


def evenly(items: list, k: int) -> list:
    """``k`` items spread evenly over ``items`` (all of them when k >= len)."""
    if k >= len(items):
        return list(items)
    step = len(items) / k
    return [items[int(i * step)] for i in range(k)]


def take_census(data: str, columns: ColumnsConfig, storage_options: dict | None, fmt: str = "auto",
                max_shards: int = 4) -> Census:
    """Count the rows per task in at most ``max_shards`` shards of ``data``, spread evenly over its shards."""
    shards = datasets.list_shards(data, storage_options, fmt)
    counted: Counter[str] = Counter()
    picked = evenly(shards, max_shards)
    for shard in picked:
        result = datasets.read_shard(shard, columns, storage_options, fmt)
        task, _, _ = routed(result.table)
        counted.update(task.to_pylist())
        counted[TASK_FAILED] += len(result.errors)
    return Census({t: counted.get(t, 0) for t in TASKS}, len(shards), len(picked))
