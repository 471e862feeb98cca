"""The retrieval stage: each actor holds one or more knowledge-base shards, loaded once.

Shards are searched stage after stage: every stage merges its shards' stage-1 candidates into the
running top-k carried in the batch (``cand_*`` columns); the stage holding the last shard ranks the
merged candidates by the fused score (stage 2) and writes ``ret_*`` columns.
"""

from __future__ import annotations

import time

import numpy as np

from actors.resources import Resources
from pipeline import kb as kbmod
from pipeline.config import RetrievalConfig
from pipeline.retrieval import (
    Neighbours,
    finish_retrieval,
    merge_candidates,
    searched_modality,
    shard_candidates,
)
from pipeline.schema import TASK_I2T, TASK_T2I, numpy_stage

CANDIDATE_FIELDS = ("ids", "fused", "intra", "cross")


class RetrieveNeighbours:
    """Stage-1 search of the held shards for i2t (``observed='image'``) or t2i rows, merged into the batch."""

    RESOURCES = Resources(num_cpus=0.125, memory_gb=2.0, batch_size=64)

    def __init__(self, kb_uri: str, storage_options: dict | None, shards: list[int], observed: str,
                 retrieval: RetrievalConfig, last: bool):
        self.kb = kbmod.load(kb_uri, storage_options, shards=shards, with_entries=False,
                             searched=searched_modality(observed, retrieval))
        self.observed, self.cfg, self.last = observed, retrieval, last
        self.task = TASK_I2T if observed == "image" else TASK_T2I
        self.other_dim = self.kb.manifest["text_dim" if observed == "image" else "image_dim"]

    @numpy_stage
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        n = len(batch["row_key"])
        rows = np.flatnonzero(np.asarray(batch["task"], dtype=object) == self.task)
        out = dict(batch)
        k = self.cfg.top_k
        if "pseudo" not in out:
            out["pseudo"] = np.zeros((n, self.other_dim), np.float32)
            if rows.size:
                out["pseudo"][rows] = self.kb.pseudo(np.asarray(batch["query"])[rows], self.observed)
            out.update(_empty_candidates(n, k))
        if rows.size:
            query, pseudo = np.asarray(batch["query"])[rows], np.asarray(out["pseudo"])[rows]
            parts = [shard_candidates(s, query, pseudo, self.observed, self.cfg) for s in self.kb.shards]
            running = Neighbours(*(np.asarray(out[f"cand_{f}"])[rows] for f in CANDIDATE_FIELDS))
            merged = merge_candidates([running, *parts], k)
            for f in CANDIDATE_FIELDS:
                col = np.array(out[f"cand_{f}"], copy=True)
                col[rows, : getattr(merged, f).shape[1]] = getattr(merged, f)
                out[f"cand_{f}"] = col
        spent = (time.perf_counter() - t0) / max(rows.size, 1)
        seconds = np.array(out.get("seconds_retrieve", np.zeros(n, np.float32)), dtype=np.float32)
        seconds[rows] += spent
        out["seconds_retrieve"] = seconds
        if self.last:
            out = _finish(out, rows, self.cfg)
        return out


def _empty_candidates(n: int, k: int) -> dict[str, np.ndarray]:
    return {
        "cand_ids": np.full((n, k), -1, np.int64),
        "cand_fused": np.full((n, k), -np.inf, np.float32),
        "cand_intra": np.full((n, k), -np.inf, np.float32),
        "cand_cross": np.full((n, k), -np.inf, np.float32),
    }


def _finish(batch: dict[str, np.ndarray], rows: np.ndarray, cfg: RetrievalConfig) -> dict[str, np.ndarray]:
    """Stage 2 on the merged candidates: ``ret_*`` columns with n_results neighbours per row."""
    n, r = len(batch["row_key"]), cfg.n_results
    ret = {
        "ret_ids": np.full((n, r), -1, np.int64),
        "ret_fused": np.full((n, r), -np.inf, np.float32),
        "ret_cross": np.full((n, r), -np.inf, np.float32),
    }
    if rows.size:
        cand = Neighbours(*(np.asarray(batch[f"cand_{f}"])[rows] for f in CANDIDATE_FIELDS))
        done = finish_retrieval(cand, cfg)
        ret["ret_ids"][rows], ret["ret_fused"][rows], ret["ret_cross"][rows] = done.ids, done.fused, done.cross
    out = {k: v for k, v in batch.items() if not k.startswith("cand_")}
    out.update(ret)
    return out
