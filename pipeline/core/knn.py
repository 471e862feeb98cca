"""Blocked exact nearest-neighbour search with FAISS, and the input checks every vector function shares.

No function here materialises an N x M similarity matrix: queries go to FAISS in blocks, and FAISS
itself tiles the database, so memory is O(block * k) beyond the inputs.
"""

from __future__ import annotations

import faiss
import numpy as np

DEFAULT_BLOCK = 65_536


class EmbeddingError(ValueError):
    """Embeddings that cannot be used as they are (NaN/inf, zero rows, wrong shape, empty)."""


def check_matrix(x: np.ndarray, name: str, *, allow_empty: bool = False) -> np.ndarray:
    """Return ``x`` as C-contiguous float32 [n, d], or raise EmbeddingError saying what is wrong."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise EmbeddingError(f"{name} must be a 2-D array [rows, dims], got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise EmbeddingError(f"{name} has zero dimensions")
    if arr.shape[0] == 0 and not allow_empty:
        raise EmbeddingError(f"{name} is empty: at least one row is needed")
    if not np.issubdtype(arr.dtype, np.floating):
        raise EmbeddingError(f"{name} must hold floats, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)[:5].tolist()
        raise EmbeddingError(
            f"{name} has {int(bad.sum())} rows with NaN or inf (first: {rows}); drop or re-embed them"
        )
    return arr


def normalize_rows(x: np.ndarray, name: str = "embeddings") -> np.ndarray:
    """Unit-L2 rows (cosine geometry); zero rows are an error, never a silent NaN."""
    arr = check_matrix(x, name)
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    zero = norms[:, 0] < 1e-12
    if zero.any():
        rows = np.flatnonzero(zero)[:5].tolist()
        raise EmbeddingError(f"{name} has {int(zero.sum())} zero vectors (first: {rows}); they have no direction")
    return arr / norms


def same_dim(a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> None:
    if a.shape[1] != b.shape[1]:
        raise EmbeddingError(
            f"{names[0]} has {a.shape[1]} dims but {names[1]} has {b.shape[1]}: "
            "both must come from the same encoder space"
        )


def flat_index(base: np.ndarray) -> faiss.Index:
    """An exact inner-product index over ``base`` (float32 [n, d])."""
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(np.ascontiguousarray(base, dtype=np.float32))
    return index


def search_blocks(
    index: faiss.Index, queries: np.ndarray, k: int, block_size: int = DEFAULT_BLOCK
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner products of each query row against ``index``, searched ``block_size`` rows at a time."""
    if k > index.ntotal:
        raise EmbeddingError(f"k={k} is larger than the {index.ntotal} indexed rows; lower k")
    n = queries.shape[0]
    scores = np.empty((n, k), dtype=np.float32)
    ids = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        scores[start:stop], ids[start:stop] = index.search(
            np.ascontiguousarray(queries[start:stop], dtype=np.float32), k
        )
    return scores, ids


def knn(
    queries: np.ndarray, base: np.ndarray, k: int, block_size: int = DEFAULT_BLOCK
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner-product neighbours of each query row among the rows of ``base``."""
    return search_blocks(flat_index(base), queries, k, block_size)
