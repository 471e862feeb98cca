"""Two-stage fusion retrieval (RAG4DMC, Key Design 2, retrieval step): the one implementation.

Stage 1: intra-modal top-k of the query among knowledge-base entries of the same modality.
Stage 2: rerank by

    sim_fuse(q, r) = alpha * cos(z_q, z_r) + (1 - alpha) * cos(z_hat_other, z_r_other),

where z_hat_other is the mapping's pseudo-embedding of the query in the missing modality and
z_r_other is the candidate's embedding in that modality. The paper's baselines sit behind the same
code (``RetrievalConfig.mode``): ``intra`` (stage 1 only), ``mapped`` (the pseudo-embedding against the
other modality's index) and ``cross`` (the raw query against the other modality's index, for encoders
with a shared image-text space such as CLIP).

A knowledge base is a list of :class:`Shard` (row ranges holding both modalities). Each step is what one
retrieval actor does: :func:`shard_candidates` searches one shard, :func:`merge_candidates` keeps the
global stage-1 top-k of several, :func:`finish_retrieval` ranks them by the mode's score. The job chains
them across actors (a running top-k in the batch); Serve, the knowledge base and the evaluation call
:func:`search`, which is the three in a row; :func:`retrieve` runs it over in-memory matrices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rag4dmc.pipeline.config import RetrievalConfig
from rag4dmc.pipeline.core.index import VectorIndex
from rag4dmc.pipeline.core.knn import EmbeddingError, normalize_rows

MODALITIES = ("image", "text")


@dataclass(frozen=True)
class Neighbours:
    """Ranked knowledge-base rows per query (best first), with both similarity terms and the ranking score."""

    ids: np.ndarray  # int64 [n, r]; -1 where fewer than r entries exist
    fused: np.ndarray  # float32 [n, r]: the score the rows are ranked by (stage 1's until finish_retrieval)
    intra: np.ndarray  # cos(z_q, z_r)
    cross: np.ndarray  # cos(z_hat_other, z_r_other)


@dataclass
class Shard:
    """Rows [start, stop) of the knowledge base with an index per modality."""

    start: int
    stop: int
    image: VectorIndex
    text: VectorIndex

    def index(self, modality: str) -> VectorIndex:
        return self.image if modality == "image" else self.text

    def vectors(self, modality: str) -> np.ndarray:
        return self.index(modality).vectors


def other_modality(observed: str) -> str:
    return "text" if observed == "image" else "image"


def fusion_scores(intra: np.ndarray, cross: np.ndarray, alpha: float) -> np.ndarray:
    """sim_fuse = alpha * cos(z_q, z_r) + (1 - alpha) * cos(z_hat_other, z_r_other)."""
    return alpha * intra + (1.0 - alpha) * cross


def rank_by(ids: np.ndarray, score: np.ndarray, intra: np.ndarray, cross: np.ndarray, n: int) -> Neighbours:
    """Order candidates by ``score`` (padding last) and keep the best n."""
    score = np.where(ids >= 0, score, -np.inf).astype(np.float32)
    order = np.argsort(-score, axis=1, kind="stable")[:, :n]
    return Neighbours(*(np.take_along_axis(a, order, 1) for a in (ids, score, intra, cross)))


def searched_modality(observed: str, cfg: RetrievalConfig) -> str:
    """The modality whose index stage 1 searches: the query's own, or the other one in mapped / cross mode."""
    return other_modality(observed) if cfg.mode in ("mapped", "cross") else observed


def check_mode(cfg: RetrievalConfig, image_dim: int, text_dim: int) -> None:
    """Refuse, before any search, a mode the knowledge base's embeddings cannot support."""
    if cfg.mode == "cross" and image_dim != text_dim:
        raise EmbeddingError(
            f"retrieval.mode 'cross' compares a query with the other modality's embeddings, but this knowledge "
            f"base has {image_dim}-d images and {text_dim}-d texts: 'cross' needs a shared image-text space "
            "(e.g. CLIP); use 'mapped' or 'fusion'")


def shard_candidates(shard: Shard, query: np.ndarray, pseudo: np.ndarray, observed: str,
                     cfg: RetrievalConfig) -> Neighbours:
    """Stage 1 within one shard (top_k for fusion, n_results otherwise), with both terms of each candidate."""
    other = other_modality(observed)
    query = normalize_rows(query, "queries")
    pseudo = normalize_rows(pseudo, "pseudo-embeddings")
    check_mode(cfg, shard.index("image").dim, shard.index("text").dim)
    k = cfg.top_k if cfg.mode == "fusion" else cfg.n_results
    probe = {"mapped": pseudo, "cross": query}.get(cfg.mode, query)
    searched = searched_modality(observed, cfg)
    stage1, ids = shard.index(searched).search(probe, k)
    stage1 = np.where(ids >= 0, stage1, -np.inf).astype(np.float32)
    local = np.where(ids >= 0, ids - shard.start, 0)

    def cosines(x: np.ndarray, modality: str) -> np.ndarray:
        out = np.einsum("nd,nkd->nk", x, shard.index(modality).gather(local)).astype(np.float32)
        out[ids < 0] = -np.inf
        return out

    # Stage 1's own score is one of the two terms when it searched with the query (intra) or the pseudo-embedding
    # (mapped) in that vector's modality: only the other term gathers vectors.
    intra = stage1 if cfg.mode in ("fusion", "intra") else cosines(query, observed)
    cross = stage1 if cfg.mode == "mapped" else cosines(pseudo, other)
    return Neighbours(ids=ids, fused=stage1, intra=intra, cross=cross)


def merge_candidates(parts: list[Neighbours], k: int) -> Neighbours:
    """Keep each query's global top-k of the shards' stage-1 candidates (``fused`` holds the stage-1 score)."""
    cat = [np.concatenate([getattr(p, f) for p in parts], axis=1) for f in ("ids", "fused", "intra", "cross")]
    order = np.argsort(-cat[1], axis=1, kind="stable")[:, :k]
    return Neighbours(*(np.take_along_axis(a, order, 1) for a in cat))


def finish_retrieval(cand: Neighbours, cfg: RetrievalConfig) -> Neighbours:
    """Stage 2: rank the merged candidates by the mode's score (sim_fuse for fusion) and keep n_results."""
    score = fusion_scores(cand.intra, cand.cross, cfg.alpha) if cfg.mode == "fusion" else cand.fused
    return rank_by(cand.ids, score, cand.intra, cand.cross, cfg.n_results)


def search(shards: list[Shard], query: np.ndarray, pseudo: np.ndarray, observed: str,
           cfg: RetrievalConfig = RetrievalConfig()) -> Neighbours:
    """Ranked neighbours of each query over every shard: shard_candidates -> merge_candidates -> finish_retrieval."""
    if not shards or sum(s.stop - s.start for s in shards) == 0:
        raise EmbeddingError("the knowledge base is empty: build it with internal pairs first")
    k = cfg.top_k if cfg.mode == "fusion" else cfg.n_results
    return finish_retrieval(merge_candidates([shard_candidates(s, query, pseudo, observed, cfg) for s in shards], k),
                            cfg)


def retrieve(query: np.ndarray, pseudo: np.ndarray, same: np.ndarray, other: np.ndarray,
             cfg: RetrievalConfig = RetrievalConfig()) -> Neighbours:
    """:func:`search` over in-memory, row-aligned embeddings: ``same`` of the query's modality, ``other`` of the
    missing one (exact indexes, one shard)."""
    if len(same) != len(other):
        raise EmbeddingError(f"knowledge base views differ in length: {len(same)} vs {len(other)}")
    if len(same) == 0:
        raise EmbeddingError("the knowledge base is empty: build it with internal pairs first")
    shard = Shard(0, len(same), VectorIndex.build(normalize_rows(same, "knowledge base (query modality)"),
                                                  kind="flat"),
                  VectorIndex.build(normalize_rows(other, "knowledge base (other modality)"), kind="flat"))
    if len(query) != len(pseudo):
        raise EmbeddingError(f"{len(query)} queries but {len(pseudo)} pseudo-embeddings")
    return search([shard], query, pseudo, "image", cfg)  # "image" names the query's side of this shard
