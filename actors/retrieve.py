"""The retrieval stage: each actor holds one or more knowledge-base shards, loaded once in ``setup``.

The shards are split into groups, one stage per group, chained in the job. Each stage has a role:

* ``first`` maps the query to its pseudo-embedding (``pseudo``) and starts the running stage-1 top-k
  (``cand_*`` columns) from its shards;
* ``middle`` merges its shards' candidates into the running top-k;
* ``last`` merges its own, then ranks the merged candidates by the fused score (stage 2) into ``ret_*``;
* ``only`` (one group holds every shard) does all three.

Each step is a function of ``rag4dmc.pipeline.core.retrieval`` (``shard_candidates``, ``merge_candidates``,
``finish_retrieval``), the same ones Serve and the evaluation call through ``retrieval.search``.
"""

from __future__ import annotations

import numpy as np

from rag4dmc.actors.resources import Resources
from rag4dmc.actors.stage import Column, Produced, Stage
from rag4dmc.pipeline.config import RetrievalConfig
from rag4dmc.pipeline.core.retrieval import (
    Neighbours,
    finish_retrieval,
    merge_candidates,
    searched_modality,
    shard_candidates,
)
from rag4dmc.pipeline.kb import store as kb_store
from rag4dmc.pipeline.schema import TASK_I2T, TASK_T2I

CANDIDATE_FIELDS = ("ids", "fused", "intra", "cross")
RESULT_FIELDS = ("ids", "fused", "cross")
ROLES = ("first", "middle", "last", "only")


def role_of(group: int, n_groups: int) -> str:
    """The role of shard group ``group`` of ``n_groups`` in the chain."""
    if n_groups == 1:
        return "only"
    return "first" if group == 0 else "last" if group == n_groups - 1 else "middle"


def candidate_width(cfg: RetrievalConfig) -> int:
    """Stage-1 candidates carried per row: top_k for fusion (reranked later), n_results otherwise."""
    return cfg.top_k if cfg.mode == "fusion" else cfg.n_results


def _fields(prefix: str, names, width: int) -> tuple[Column, ...]:
    return tuple(Column(f"{prefix}{f}", -1, np.int64, (width,)) if f == "ids"
                 else Column(f"{prefix}{f}", -np.inf, np.float32, (width,)) for f in names)


class RetrieveNeighbours(Stage):
    """Stage-1 search of the held shards for i2t (``observed='image'``) or t2i rows; see the module for roles."""

    name, accounts = "retrieve", "retrieve"
    # 256 queries per call: an exact (flat) index answers 4-8x more queries/s at 256 than at 64 (FAISS multiplies
    # thin matrices poorly), an IVF index about the same at 64, 256 and 1024 (bench/retrieval.py, section 2)
    # cost: 0.008 actor-seconds per row against a 1M-row KB (bench/kb_scale.py, docs/benchmarks.md section 7)
    RESOURCES = Resources(num_cpus=0.125, memory_gb=2.0, batch_size=256, seconds_per_row=0.008)

    def __init__(self, kb_uri: str, storage_options: dict | None, shards: list[int], observed: str,
                 retrieval: RetrievalConfig, role: str, image_dim: int, text_dim: int):
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.kb_uri, self.storage_options, self.shards = kb_uri, storage_options, shards
        self.observed, self.cfg, self.role = observed, retrieval, role
        self.tasks = (TASK_I2T,) if observed == "image" else (TASK_T2I,)
        first, last = role in ("first", "only"), role in ("last", "only")
        cand = tuple(f"cand_{f}" for f in CANDIDATE_FIELDS)
        self.reads = ("query",) if first else ("query", "pseudo", *cand)
        other_dim = text_dim if observed == "image" else image_dim
        writes = (Column("pseudo", 0.0, np.float32, (other_dim,)),) if first else ()
        if last:
            writes += _fields("ret_", RESULT_FIELDS, retrieval.n_results)
        else:
            writes += _fields("cand_", CANDIDATE_FIELDS, candidate_width(retrieval))
        self.writes = writes
        self.drops = cand if last and not first else ()

    def setup(self) -> None:
        self.kb = kb_store.load(self.kb_uri, self.storage_options, shards=self.shards, with_entries=False,
                             searched=searched_modality(self.observed, self.cfg))

    def process(self, rows):
        query = np.asarray(rows["query"])
        first, last = self.role in ("first", "only"), self.role in ("last", "only")
        pseudo = self.kb.pseudo(query, self.observed) if first else np.asarray(rows["pseudo"])
        parts = [shard_candidates(s, query, pseudo, self.observed, self.cfg) for s in self.kb.shards]
        if not first:
            parts.insert(0, Neighbours(*(np.asarray(rows[f"cand_{f}"]) for f in CANDIDATE_FIELDS)))
        width = candidate_width(self.cfg)
        merged = _pad(merge_candidates(parts, width), width)
        out: dict[str, np.ndarray] = {"pseudo": pseudo} if first else {}
        if last:
            done = _pad(finish_retrieval(merged, self.cfg), self.cfg.n_results)
            out.update({f"ret_{f}": getattr(done, f) for f in RESULT_FIELDS})
        else:
            out.update({f"cand_{f}": getattr(merged, f) for f in CANDIDATE_FIELDS})
        return Produced(out)

    def __repr__(self) -> str:
        return f"RetrieveNeighbours({self.observed}, shards {self.shards}, {self.role})"


def _pad(nb: Neighbours, width: int) -> Neighbours:
    """Neighbours with exactly ``width`` columns (a KB smaller than k gives fewer): padding is id -1, -inf."""
    have = nb.ids.shape[1]
    if have >= width:
        return Neighbours(*(getattr(nb, f)[:, :width] for f in CANDIDATE_FIELDS))
    pad = width - have
    return Neighbours(np.pad(nb.ids, ((0, 0), (0, pad)), constant_values=-1),
                      *(np.pad(getattr(nb, f), ((0, 0), (0, pad)), constant_values=-np.inf)
                        for f in CANDIDATE_FIELDS[1:]))
