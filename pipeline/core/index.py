"""Knowledge-base vector indexes: exact for small KBs, IVF / IVF-PQ / HNSW for large ones, sharded.

A :class:`VectorIndex` keeps the full-precision vectors beside its FAISS index and reranks the
approximate candidates exactly, so quantisation costs speed, not ranking quality. Shards cover
contiguous row ranges (:func:`build_shards`); ``rag4dmc.pipeline.core.retrieval.merge_candidates`` merges their answers.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np

from rag4dmc.pipeline.config import IndexConfig
from rag4dmc.pipeline.core.knn import DEFAULT_BLOCK, EmbeddingError, normalize_rows

log = logging.getLogger(__name__)

MIN_ROWS_PER_LIST = 39  # FAISS's own lower bound for a meaningful k-means
EXACT_SCORE_KINDS = ("flat", "ivf", "hnsw")  # FAISS stores full vectors: its scores are exact, only PQ reranks
RERANK_GATHER_BYTES = 256 * 2**20  # candidate vectors a search holds at once for its exact rerank
# Queries whose candidates the rerank gathers and converts at once: their buffers stay in cache (bench/retrieval.py)
RERANK_CHUNK_QUERIES = 4
INDEX_FILE, VECTORS_FILE, META_FILE = "index.faiss", "vectors.npy", "meta.json"  # a saved index folder
KINDS = ("flat", "ivf", "ivfpq", "hnsw")
PQ_CENTROIDS = 256  # 8-bit PQ codes
# float16 values a process casts with numpy before it imports torch for the rest (to_float32): about 0.5 s of
# numpy's cast here, a quarter of torch's import
TORCH_CAST_AFTER = 2**28
_numpy_casts = [0]  # values cast with numpy so far in this process


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    """The threads an exact rerank runs on (one pool per size, kept for the process: actors search often)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="rag4dmc-rerank")


def to_float32(src: np.ndarray, out: np.ndarray) -> None:
    """Copy float16 ``src`` into float32 ``out``. torch's copy is vectorised (F16C / AVX-512); numpy 2.4's cast
    ran 8x slower, and it was most of an IVF-PQ search's exact rerank (bench/retrieval.py). Importing torch costs
    a process about 2 s, so numpy casts until this process has cast ``TORCH_CAST_AFTER`` values (rent, then buy):
    a small KB's or a short job's searches never import torch, a long search soon does."""
    if _numpy_casts[0] < TORCH_CAST_AFTER:
        _numpy_casts[0] += src.size
        out[...] = src
        return
    import torch

    torch.from_numpy(out).copy_(torch.from_numpy(src))


def pq_subquantizers(dim: int, cfg: IndexConfig) -> int:
    """One-byte PQ sub-quantisers: ``pq_m``, or the largest divisor of ``dim`` within ``bytes_per_row``."""
    if cfg.pq_m is not None:
        if dim % cfg.pq_m:
            raise EmbeddingError(f"index.pq_m={cfg.pq_m} must divide the dimension {dim}: pick a divisor of {dim}")
        return cfg.pq_m
    return max(m for m in range(1, min(dim, cfg.bytes_per_row) + 1) if dim % m == 0)


def choose_kind(n: int, cfg: IndexConfig, dim: int = 512) -> str:
    """The index kind for n rows of ``dim`` dims: the configured one, or from the row count and byte budget."""
    if cfg.kind != "auto":
        return cfg.kind
    if n <= cfg.flat_max_rows:
        return "flat"
    return "ivf" if 4 * dim <= cfg.bytes_per_row else "ivfpq"


def code_bytes(kind: str, dim: int, cfg: IndexConfig) -> int:
    """FAISS's bytes per row for this kind (codes and ids), not counting the float16 vectors kept for rerank."""
    return {"flat": 4 * dim, "ivf": 4 * dim + 8, "ivfpq": pq_subquantizers(dim, cfg) + 8,
            "hnsw": 4 * dim + 8 * cfg.hnsw_m}[kind]


def nlist_for(n: int, cfg: IndexConfig) -> int:
    """IVF lists: the configured number, or 2 sqrt(n), with at least 39 rows per list."""
    nlist = cfg.nlist or int(2 * math.sqrt(n))
    return max(1, min(nlist, n // MIN_ROWS_PER_LIST or 1))


def factory_string(n: int, dim: int, kind: str, cfg: IndexConfig) -> str:
    """The ``faiss.index_factory`` description of an index over n rows (e.g. ``IVF2000,PQ64np``)."""
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return f"HNSW{cfg.hnsw_m},Flat"
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}: use flat, ivf, ivfpq or hnsw")
    nlist = nlist_for(n, cfg)
    ivf = f"IVF{nlist}" + (f"_HNSW{cfg.hnsw_m}" if nlist >= cfg.hnsw_quantizer_min_lists else "")
    if kind == "ivf":
        return f"{ivf},Flat"
    m = pq_subquantizers(dim, cfg)
    opq = f"OPQ{m}," if cfg.opq else ""
    return f"{opq}{ivf},PQ{m}np"  # np: no polysemous training (10x the training time; its codes go unused)


def train_rows(n: int, kind: str, cfg: IndexConfig) -> int:
    """Rows the index is trained on: ``train_points_per_list`` per IVF list (0: nothing to train)."""
    if kind not in ("ivf", "ivfpq"):
        return 0
    wanted = nlist_for(n, cfg) * cfg.train_points_per_list
    if kind == "ivfpq":  # each sub-quantiser is a 256-centroid k-means of its own
        wanted = max(wanted, PQ_CENTROIDS * MIN_ROWS_PER_LIST)
    return min(n, wanted)


def train_empty(sample: np.ndarray, n: int, kind: str, cfg: IndexConfig) -> faiss.Index:
    """An empty inner-product index for n rows, trained on ``sample`` (a random sample of them)."""
    dim = sample.shape[1]
    index = faiss.index_factory(dim, factory_string(n, dim, kind, cfg), faiss.METRIC_INNER_PRODUCT)
    if kind in ("ivf", "ivfpq"):
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    set_search_params(index, kind, cfg)
    return index


def set_search_params(index: faiss.Index, kind: str, cfg: IndexConfig, nprobe: int | None = None) -> int:
    """efSearch of an HNSW index; nprobe of an IVF one (inside any OPQ transform; ``cfg.nprobe`` unless given),
    with an HNSW coarse quantiser searched ``quantizer_ef_per_probe`` deep per list. Returns the nprobe set (0:
    not an IVF index)."""
    if kind == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = cfg.hnsw_ef_search
    if kind not in ("ivf", "ivfpq"):
        return 0
    probes = min(nprobe or cfg.nprobe, faiss.extract_index_ivf(index).nlist)
    apply_probe(index, probes, quantizer_ef_for(probes, cfg))
    return probes


def apply_probe(index: faiss.Index, nprobe: int, quantizer_ef: int) -> None:
    """Search ``nprobe`` lists of an IVF index (inside any OPQ transform), and its coarse quantiser, if an HNSW
    graph, ``quantizer_ef`` deep (0: as it is)."""
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = nprobe
    quantizer = faiss.downcast_index(ivf.quantizer)
    if quantizer_ef and isinstance(quantizer, faiss.IndexHNSW):
        quantizer.hnsw.efSearch = quantizer_ef


def quantizer_ef_for(nprobe: int, cfg: IndexConfig) -> int:
    """An HNSW coarse quantiser's efSearch for ``nprobe`` lists: ``quantizer_ef_per_probe`` per list, at least
    FAISS's default of 16."""
    return max(nprobe * cfg.quantizer_ef_per_probe, 16)


def index_nprobe(index: faiss.Index | None) -> int:
    """The nprobe an index searches with (0: not an IVF index)."""
    try:
        return int(faiss.extract_index_ivf(index).nprobe)
    except RuntimeError:  # FAISS: "could not extract IVF index"
        return 0


def build_faiss(vectors: np.ndarray, kind: str, cfg: IndexConfig, seed: int = 0) -> faiss.Index:
    """A trained, filled inner-product FAISS index of the given kind (trained on a random sample)."""
    n = len(vectors)
    rows = np.sort(np.random.default_rng(seed).choice(n, train_rows(n, kind, cfg), replace=False))
    index = train_empty(vectors[rows], n, kind, cfg)
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def _doubling(least: int, most: int) -> list[int]:
    out = [least]
    while out[-1] * 2 <= most:
        out.append(out[-1] * 2)
    return out


def rerank_factors(kind: str, cfg: IndexConfig) -> list[int]:
    """The rerank depths a build measures, from ``rerank_factor`` doubling up to ``max_rerank_factor`` (one for
    the kinds whose FAISS scores are exact already: they rerank nothing)."""
    return [cfg.rerank_factor] if kind in EXACT_SCORE_KINDS else _doubling(cfg.rerank_factor, cfg.max_rerank_factor)


def nprobes(kind: str, cfg: IndexConfig, nlist: int) -> list[int]:
    """The nprobe values a build measures: from ``nprobe`` doubling, up to and including the lesser of
    ``max_nprobe`` and the lists there are ([0] for an index that is not IVF)."""
    if kind not in ("ivf", "ivfpq"):
        return [0]
    most = min(cfg.max_nprobe, nlist)
    out = _doubling(min(cfg.nprobe, nlist), most)
    return out if out[-1] == most else [*out, most]  # every list, when max_nprobe allows it, is tried


def search_grid(kind: str, cfg: IndexConfig, nlist: int) -> list[tuple[int, int]]:
    """The (nprobe, rerank depth) pairs a build measures the recall of."""
    return [(p, f) for p in nprobes(kind, cfg, nlist) for f in rerank_factors(kind, cfg)]


def pick_search(recall: dict[tuple[int, int], float], min_recall: float) -> tuple[int, int]:
    """The (nprobe, rerank depth) a KB searches with: the least nprobe at which some depth reaches ``min_recall``
    (probing finds the neighbours), then the least such depth there (reranking orders them); when no pair
    reaches it, the pair of highest recall (the cheaper of equals)."""
    enough = sorted(pf for pf, r in recall.items() if r >= min_recall)
    if enough:
        return enough[0]
    return min(recall, key=lambda pf: (-recall[pf], pf))


RECALL_K = 10  # the k of the recall@k an index is measured at (the KB build keeps the search that reaches min_recall)


def recall_at_k(approx: np.ndarray, exact: np.ndarray, k: int = RECALL_K) -> float:
    """Mean |approx top-k & exact top-k| / k over queries (padding ids < 0 never match)."""
    hits = [len(set(a[:k][a[:k] >= 0]) & set(e[:k][e[:k] >= 0])) for a, e in zip(approx, exact)]
    return float(np.mean(hits) / k) if hits else float("nan")


class VectorIndex:
    """One modality's vectors (one shard of them) with exact rerank of approximate candidates."""

    def __init__(self, vectors: np.ndarray, index: faiss.Index, kind: str, rerank_factor: int, offset: int = 0):
        self.vectors, self.index, self.kind = vectors, index, kind
        self.rerank_factor, self.offset = rerank_factor, offset
        self.quantizer_ef = _quantizer_ef(index)  # an HNSW coarse quantiser's efSearch (0: none), for the metadata

    @property
    def nprobe(self) -> int:
        """IVF lists probed per query (0: not an IVF index)."""
        return index_nprobe(self.index) if self.index is not None else 0

    def set_nprobe(self, nprobe: int, cfg: IndexConfig = IndexConfig()) -> None:
        """Probe ``nprobe`` lists (an HNSW coarse quantiser ``cfg.quantizer_ef_per_probe`` deep per list)."""
        set_search_params(self.index, self.kind, cfg, nprobe)
        self.quantizer_ef = _quantizer_ef(self.index)

    @classmethod
    def build(cls, vectors: np.ndarray, cfg: IndexConfig = IndexConfig(), offset: int = 0,
              kind: str | None = None) -> VectorIndex:
        vectors = normalize_rows(vectors, "knowledge-base vectors")
        kind = kind or choose_kind(len(vectors), cfg, vectors.shape[1])
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
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        ids = np.full((len(q), k), -1, dtype=np.int64)
        if self.kind in EXACT_SCORE_KINDS:  # FAISS's inner products are the exact cosines: nothing to rerank
            top, cand = self.index.search(q, k_eff)
            scores[:, :k_eff] = np.where(cand >= 0, top, -np.inf)
            ids[:, :k_eff] = np.where(cand >= 0, cand + self.offset, -1)
            return scores, ids
        fetch = min(len(self), k_eff * self.rerank_factor)
        # the rerank gathers (queries x fetch x dim) float32 vectors: bound that, whatever the depth
        block_size = max(1, min(block_size, RERANK_GATHER_BYTES // max(1, fetch * self.dim * 4)))
        threads = max(1, faiss.omp_get_max_threads())  # the CPUs this process was given (FAISS's own threads)
        for s in range(0, len(q), block_size):
            block = q[s : s + block_size]
            _, cand = self.index.search(block, fetch)
            # the rerank is a gather of scattered rows (memory-latency bound, and numpy releases the GIL in it):
            # split over the same threads as FAISS's search
            bounds = np.linspace(0, len(block), min(threads, len(block)) + 1).astype(int)
            pieces = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
            args = ([block[r] for r in pieces], [cand[r] for r in pieces], [k_eff] * len(pieces))
            reranked = _pool(len(pieces)).map(self._rerank, *args) if len(pieces) > 1 else map(self._rerank, *args)
            for r, (top, best) in zip(pieces, reranked):
                rows = slice(s + r.start, s + r.stop)
                scores[rows, :k_eff] = top
                ids[rows, :k_eff] = np.where(best >= 0, best + self.offset, -1)
        return scores, ids

    def _rerank(self, queries: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The exact top-k (scores, local ids) among approximate candidates, by the stored vectors."""
        valid = cand >= 0
        safe = np.where(valid, cand, 0)
        exact = np.empty(cand.shape, np.float32)
        step = RERANK_CHUNK_QUERIES
        rows = np.empty((min(step, len(cand)), cand.shape[1], self.dim), np.float32)  # reused by every chunk
        for s in range(0, len(cand), step):
            n = min(step, len(cand) - s)
            exact[s : s + n] = np.einsum("nd,nkd->nk", queries[s : s + n], self.gather(safe[s : s + n], rows[:n]))
        exact[~valid] = -np.inf
        order = np.argsort(-exact, axis=1)[:, :k]
        return np.take_along_axis(exact, order, 1), np.take_along_axis(cand, order, 1)

    def gather(self, local_ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """float32 vectors of local row ids (any shape), written to ``out`` if given; the stored ones may be
        float16."""
        ids = np.asarray(local_ids).ravel()
        out = np.empty((*np.shape(local_ids), self.dim), np.float32) if out is None else out
        if not out.flags.c_contiguous:
            raise ValueError("gather writes into a C-contiguous float32 array; pass np.ascontiguousarray(out)")
        flat = out.reshape(len(ids), self.dim)
        if self.vectors.dtype == np.float32:
            np.take(self.vectors, ids, axis=0, out=flat)
        else:
            to_float32(np.take(self.vectors, ids, axis=0), flat)
        return out

    def save(self, folder: str | Path) -> None:
        """The index, its vectors (as stored: float32 or float16) and its metadata in ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / VECTORS_FILE, self.vectors)
        self.save_index(folder)

    def meta(self) -> dict:
        """What :meth:`load` restores beside the FAISS file: the kind, the search settings the build chose, the
        first global row id."""
        return {"kind": self.kind, "rerank_factor": self.rerank_factor, "nprobe": self.nprobe,
                "quantizer_ef": self.quantizer_ef, "offset": self.offset}

    def save_index(self, folder: str | Path) -> None:
        """The FAISS index and the metadata only (the vectors are already in ``folder``, memory-mapped)."""
        folder = Path(folder)
        faiss.write_index(self.index, str(folder / INDEX_FILE))
        (folder / META_FILE).write_text(json.dumps(self.meta()))

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
        out = cls(vectors, index, meta["kind"], meta["rerank_factor"], meta["offset"])
        if index is not None and meta.get("nprobe"):  # the build's choice (older KBs: what the FAISS file holds)
            apply_probe(index, meta["nprobe"], meta.get("quantizer_ef", 0))
            out.quantizer_ef = _quantizer_ef(index)
        return out


def _quantizer_ef(index: faiss.Index | None) -> int:
    """efSearch of an IVF index's HNSW coarse quantiser (0: none)."""
    if not index_nprobe(index):
        return 0
    quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    return int(quantizer.hnsw.efSearch) if isinstance(quantizer, faiss.IndexHNSW) else 0


def build_shards(vectors: np.ndarray, cfg: IndexConfig = IndexConfig(), kind: str | None = None) -> list[VectorIndex]:
    """``cfg.shards`` indexes over contiguous row ranges; the kind is chosen from the full size."""
    kind = kind or choose_kind(len(vectors), cfg, vectors.shape[1])
    bounds = np.linspace(0, len(vectors), min(cfg.shards, len(vectors)) + 1).astype(int)
    return [VectorIndex.build(vectors[a:b], cfg, offset=int(a), kind=kind) for a, b in zip(bounds, bounds[1:])]
