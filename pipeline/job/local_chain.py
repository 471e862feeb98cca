"""The job's plan run in this process, without Ray: each batch's rows of each direction through that direction's
stages (``rag4dmc.pipeline.job.mapper.direction_stages``: decode/check -> embed -> retrieve -> complete), the
complete and failed rows straight on, then ``finalize``. Row for row what the job's actor pools compute: the
benchmark's single-process baseline (``bench/pipeline.py``) and the tests' reference for the distributed plan.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from rag4dmc.actors.stage import run_chain
from rag4dmc.pipeline.config import JobConfig
from rag4dmc.pipeline.io import datasets
from rag4dmc.pipeline.job.mapper import DIRECTIONS, PASS_TASKS, direction_stages
from rag4dmc.pipeline.job.reader import keyed_rows
from rag4dmc.pipeline.job.writer import finalize
from rag4dmc.pipeline.kb import store as kb_store


class LocalChain:
    """Every direction's stages, set up once (models and KB shards load once, as in the job's actors)."""

    def __init__(self, kb: str, cfg: JobConfig, storage_options: dict | None = None):
        self.cfg = cfg
        self.storage_options = storage_options
        self.manifest = kb_store.load(kb, storage_options, shards=[], with_entries=False).manifest
        self.chains = {task: direction_stages(task, cfg, kb, self.manifest, storage_options)
                       for task, _ in DIRECTIONS}
        for stages in self.chains.values():
            for stage in stages:
                stage.ensure_setup()

    def batch(self, b: dict[str, np.ndarray]) -> pa.Table:
        """One batch of keyed input rows (``reader.keyed_rows`` as numpy columns) as finalized output rows."""
        task = np.asarray(b["task"], dtype=object)
        parts = [{k: v[np.isin(task, PASS_TASKS)] for k, v in b.items()}]
        for t, stages in self.chains.items():
            rows = {k: v[task == t] for k, v in b.items()}
            if len(rows["row_key"]):
                parts.append(run_chain(stages, rows))
        fin = {"kb_version": self.manifest["version"], "config_hash": self.cfg.config_hash()}
        return pa.concat_tables([finalize(p, **fin) for p in parts if len(p["row_key"])])

    def shard_batches(self, shard: str, root: str, batch_rows: int,
                      data_format: str = "auto") -> Iterator[dict[str, np.ndarray]]:
        """Input shard ``shard`` (under ``root``) read and routed as the job's reader does, in numpy batches."""
        read = datasets.read_shard(shard, self.cfg.columns, self.storage_options, data_format)
        table = keyed_rows(shard, read, root)
        for start in range(0, table.num_rows, batch_rows):
            chunk = table.slice(start, batch_rows)
            yield {c: np.asarray(chunk.column(c).to_pylist(), dtype=object) for c in chunk.column_names}

    def shard(self, shard: str, root: str, batch_rows: int, data_format: str = "auto") -> pa.Table:
        """A whole input shard's output rows."""
        return pa.concat_tables([self.batch(b) for b in self.shard_batches(shard, root, batch_rows, data_format)])
