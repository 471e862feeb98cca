"""Two-stage fusion retrieval (RAG4DMC, Key Design 2, retrieval step).

Stage 1: intra-modal top-k of the query among knowledge-base entries of the same modality.
Stage 2: rerank by

    sim_fuse(q, r) = alpha * cos(z_q, z_r) + (1 - alpha) * cos(z_hat_other, z_r_other),

where z_hat_other is the mapping's pseudo-embedding of the query in the missing modality and
z_r_other is the candidate's embedding in that modality. Image-only and text-only queries are
symmetric: the caller passes the "same" and "other" modality views of the knowledge base.
The paper's baselines sit behind the same call (``mode``): ``intra`` (stage 1 only), ``cross``
(the raw query against the other modality, for shared-space encoders) and ``mapped`` (the
pseudo-embedding against the other modality).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.config import RetrievalConfig
from pipeline.index import VectorIndex, merge_topk
from pipeline.knn import EmbeddingError, normalize_rows


@dataclass(frozen=True)
class Neighbours:
    """Ranked knowledge-base rows per query (best first), with both similarity terms and the fused score."""

    ids: np.ndarray  # int64 [n, r]; -1 where fewer than r entries exist
    fused: np.ndarray  # float32 [n, r]
    intra: np.ndarray  # cos(z_q, z_r)
    cross: np.ndarray  # cos(z_hat_other, z_r_other)


def fusion_scores(intra: np.ndarray, cross: np.ndarray, alpha: float) -> np.ndarray:
    """sim_fuse = alpha * cos(z_q, z_r) + (1 - alpha) * cos(z_hat_other, z_r_other)."""
    return alpha * intra + (1.0 - alpha) * cross


def _gather_cos(queries: np.ndarray, table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """cos(queries[n], table[ids[n, j]]) for unit rows; -inf where ids is -1."""
    safe = np.where(ids >= 0, ids, 0)
    cos = np.einsum("nd,nkd->nk", queries, np.asarray(table)[safe]).astype(np.float32)
    cos[ids < 0] = -np.inf
    return cos


def rerank(
    query: np.ndarray,
    pseudo: np.ndarray,
    candidates: np.ndarray,
    same: np.ndarray,
    other: np.ndarray,
    alpha: float,
    n_results: int,
) -> Neighbours:
    """Stage 2: order each query's candidate rows by sim_fuse and keep the best ``n_results``."""
    intra = _gather_cos(query, same, candidates)
    cross = _gather_cos(pseudo, other, candidates)
    return rank_by(candidates, fusion_scores(intra, cross, alpha), intra, cross, n_results)


def rank_by(ids: np.ndarray, score: np.ndarray, intra: np.ndarray, cross: np.ndarray, n: int) -> Neighbours:
    """Order candidates by ``score`` (padding last) and keep the best n."""
    score = np.where(ids >= 0, score, -np.inf).astype(np.float32)
    order = np.argsort(-score, axis=1, kind="stable")[:, :n]
    return Neighbours(*(np.take_along_axis(a, order, 1) for a in (ids, score, intra, cross)))


def _search(index: VectorIndex | list[VectorIndex], queries: np.ndarray, k: int) -> np.ndarray:
    shards = index if isinstance(index, list) else [index]
    return merge_topk([s.search(queries, k) for s in shards], k)[1]


def retrieve(
    query: np.ndarray,
    pseudo: np.ndarray,
    same: np.ndarray,
    other: np.ndarray,
    cfg: RetrievalConfig = RetrievalConfig(),
    same_index: VectorIndex | list[VectorIndex] | None = None,
    other_index: VectorIndex | list[VectorIndex] | None = None,
) -> Neighbours:
    """Ranked neighbours of each query by ``cfg.mode`` (fusion by default), with both scores.

    ``query`` [n, d_same] are the observed-modality embeddings, ``pseudo`` [n, d_other] their mapped
    pseudo-embeddings; ``same`` / ``other`` are the knowledge base's embeddings of the two modalities,
    row-aligned. Indexes default to exact ones over ``same`` / ``other``.
    """
    query = normalize_rows(query, "queries")
    pseudo = normalize_rows(pseudo, "pseudo-embeddings")
    if len(query) != len(pseudo):
        raise EmbeddingError(f"{len(query)} queries but {len(pseudo)} pseudo-embeddings")
    if len(same) != len(other):
        raise EmbeddingError(f"knowledge base views differ in length: {len(same)} vs {len(other)}")
    if len(same) == 0:
        raise EmbeddingError("the knowledge base is empty: build it with internal pairs first")
    same_index = same_index if same_index is not None else VectorIndex.build(same)
    r = min(cfg.n_results, len(same))
    if cfg.mode == "fusion":
        cand = _search(same_index, query, min(cfg.top_k, len(same)))
    elif cfg.mode == "intra":
        cand = _search(same_index, query, r)
    else:
        probe = query if cfg.mode == "cross" else pseudo
        if probe.shape[1] != other.shape[1]:
            raise EmbeddingError(
                f"mode={cfg.mode!r} compares {probe.shape[1]}-d vectors with {other.shape[1]}-d ones: "
                "'cross' needs a shared image-text space (e.g. CLIP); use 'mapped' or 'fusion'"
            )
        other_index = other_index if other_index is not None else VectorIndex.build(other)
        cand = _search(other_index, probe, r)
    if cfg.mode == "fusion":
        return rerank(query, pseudo, cand, same, other, cfg.alpha, r)
    intra = _gather_cos(query, same, cand)
    cross = _gather_cos(pseudo, other, cand)
    score = {"intra": intra, "mapped": cross}.get(cfg.mode)
    if score is None:  # "cross": rank by the raw query against the other modality
        score = _gather_cos(query, other, cand)
    return rank_by(cand, score, intra, cross, r)
