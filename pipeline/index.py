"""Knowledge-base vector indexes: exact for small KBs, IVF / IVF-PQ / HNSW for large ones, sharded.

A :class:`VectorIndex` keeps the full-precision vectors beside its FAISS index and reranks the
approximate candidates exactly, so quantisation costs speed, not ranking quality. Shards cover
contiguous row ranges (:func:`build_shards`); ``pipeline.retrieval.merge_candidates`` merges their answers.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import faiss
import numpy as np

from pipeline.config import IndexConfig
from pipeline.knn import DEFAULT_BLOCK, EmbeddingError, normalize_rows

log = logging.getLogger(__name__)

TRAIN_POINTS_PER_LIST = 64  # IVF coarse quantiser trained on at most this many rows per list
MIN_ROWS_PER_LIST = 39  # FAISS's own lower bound for a meaningful k-means
INDEX_FILE, VECTORS_FILE, META_FILE = "index.faiss", "vectors.npy", "meta.json"  # a saved index folder


def choose_kind(n: int, cfg: IndexConfig) -> str:
    """The index kind for n rows: the configured one, or by size when ``auto``."""
    if cfg.kind != "auto":
        return cfg.kind
    if n <= cfg.flat_max_rows:
        return "flat"
    return "ivf" if n < cfg.pq_min_rows else "ivfpq"


def _nlist(n: int, cfg: IndexConfig) -> int:
    nlist = cfg.nlist or int(4 * math.sqrt(n))
    return max(1, min(nlist, n // MIN_ROWS_PER_LIST or 1))


def build_faiss(vectors: np.ndarray, kind: str, cfg: IndexConfig, seed: int = 0) -> faiss.Index:
    """A trained, filled inner-product FAISS index of the given kind."""
    n, d = vectors.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = cfg.hnsw_ef_search
    elif kind in ("ivf", "ivfpq"):
        nlist = _nlist(n, cfg)
        quantizer = faiss.IndexFlatIP(d)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            if d % cfg.pq_m:
                raise EmbeddingError(f"index.pq_m={cfg.pq_m} must divide the dimension {d}")
            index = faiss.IndexIVFPQ(quantizer, d, nlist, cfg.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        n_train = min(n, nlist * TRAIN_POINTS_PER_LIST)
        sample = vectors if n_train == n else vectors[np.sort(rng.choice(n, n_train, replace=False))]
        index.train(sample)
        index.nprobe = min(cfg.nprobe, nlist)
    else:
        raise ValueError(f"unknown index kind {kind!r}: use flat, ivf, ivfpq or hnsw")
    index.add(vectors)
    return index


class VectorIndex:
    """One modality's vectors (one shard of them) with exact rerank of approximate candidates."""

    def __init__(self, vectors: np.ndarray, index: faiss.Index, kind: str, rerank_factor: int, offset: int = 0):
        self.vectors, self.index, self.kind = vectors, index, kind
        self.rerank_factor, self.offset = rerank_factor, offset

    @classmethod
    def build(cls, vectors: np.ndarray, cfg: IndexConfig = IndexConfig(), offset: int = 0,
              kind: str | None = None) -> VectorIndex:
        vectors = normalize_rows(vectors, "knowledge-base vectors")
        kind = kind or choose_kind(len(vectors), cfg)
        log.info("building %s index over %d x %d vectors", kind, *vectors.shape)
        return cls(vectors, build_faiss(vectors, kind, cfg), kind, cfg.rerank_factor, offset)

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def search(self, queries: np.ndarray, k: int, block_size: int = DEFAULT_BLOCK) -> tuple[np.ndarray, np.ndarray]:
        """Exact cosine top-k (scores, global row ids); rows missing when k > len are padded with -inf / -1."""
        if self.index is None:
            raise RuntimeError("this VectorIndex was loaded with with_index=False (vectors only); load it with its "
                               "index to search it")
        q = normalize_rows(queries, "queries")
        if q.shape[1] != self.dim:
            raise EmbeddingError(f"queries have {q.shape[1]} dims, the index {self.dim}")
        k_eff = min(k, len(self))
        fetch = k_eff if self.kind == "flat" else min(len(self), k_eff * self.rerank_factor)
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        ids = np.full((len(q), k), -1, dtype=np.int64)
        for s in range(0, len(q), block_size):
            block = q[s : s + block_size]
            _, cand = self.index.search(block, fetch)
            if self.kind != "flat":  # exact rerank with full-precision vectors
                valid = cand >= 0
                exact = np.einsum("nd,nkd->nk", block, self.vectors[np.where(valid, cand, 0)])
                exact[~valid] = -np.inf
                order = np.argsort(-exact, axis=1)[:, :k_eff]
                cand = np.take_along_axis(cand, order, 1)
                top = np.take_along_axis(exact, order, 1)
            else:
                top = np.einsum("nd,nkd->nk", block, self.vectors[cand])
            scores[s : s + len(block), :k_eff] = top
            ids[s : s + len(block), :k_eff] = np.where(cand >= 0, cand + self.offset, -1)
        return scores, ids

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(folder / INDEX_FILE))
        np.save(folder / VECTORS_FILE, self.vectors)
        meta = {"kind": self.kind, "rerank_factor": self.rerank_factor, "offset": self.offset}
        (folder / META_FILE).write_text(json.dumps(meta))

    @staticmethod
    def files(with_index: bool = True) -> list[str]:
        """The files of a saved index folder that :meth:`load` reads."""
        return [META_FILE, VECTORS_FILE, *([INDEX_FILE] if with_index else [])]

    @classmethod
    def load(cls, folder: str | Path, mmap: bool = True, with_index: bool = True) -> VectorIndex:
        """Vectors memory-mapped (``mmap``); ``with_index=False`` skips the FAISS index (vectors only, no search)."""
        folder = Path(folder)
        meta = json.loads((folder / META_FILE).read_text())
        vectors = np.load(folder / VECTORS_FILE, mmap_mode="r" if mmap else None)
        index = faiss.read_index(str(folder / INDEX_FILE)) if with_index else None
        return cls(vectors, index, meta["kind"], meta["rerank_factor"], meta["offset"])


def build_shards(vectors: np.ndarray, cfg: IndexConfig = IndexConfig(), kind: str | None = None) -> list[VectorIndex]:
    """``cfg.shards`` indexes over contiguous row ranges; the kind is chosen from the full size."""
    kind = kind or choose_kind(len(vectors), cfg)
    bounds = np.linspace(0, len(vectors), min(cfg.shards, len(vectors)) + 1).astype(int)
    return [VectorIndex.build(vectors[a:b], cfg, offset=int(a), kind=kind) for a, b in zip(bounds, bounds[1:])]
