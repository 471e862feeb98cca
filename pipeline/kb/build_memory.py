"""Memory and CPUs of the out-of-core KB build: the peaks stated before it starts (from row counts, dims and
config), a refusal naming the setting to lower, the peaks each task measures, and the Ray nodes' sizes.
"""

from __future__ import annotations

import math
import resource
import threading

from rag4dmc.pipeline.config import KBConfig
from rag4dmc.pipeline.core.cluster_filter import (
    EXTERNAL_CLUSTER_CAP,
    default_clusters,
    kmeans_sample_size,
)
from rag4dmc.pipeline.core.index import RECALL_K, RERANK_GATHER_BYTES
from rag4dmc.pipeline.core.retrieval import MODALITIES

BASE_PROCESS_BYTES = 700 * 2**20  # a Python process with torch, faiss and Ray imported (668 MiB RSS measured)


METADATA_BYTES_PER_ROW = 256  # an entry's id, caption and image location in Arrow (LAION captions: ~60 bytes)


MEMORY_SAMPLE_S = 0.25  # how often a task's anonymous memory is sampled for its peak
# A step whose tasks need more than this beyond a bare process runs each task in a fresh worker (Ray's max_calls=1:
# the memory goes back to the node when the task ends); smaller ones reuse workers, which spares every task of a
# small build the start of a process that imports torch and FAISS (2-4 s each on a laptop core).
FRESH_WORKER_ABOVE_BYTES = 2**30


def peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux reports KiB): with the pages of memory-mapped files
    it has touched, which are page cache the kernel reclaims, not memory the process holds."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def anon_bytes() -> int:
    """This process's resident anonymous memory now (``RssAnon``: what it holds, mapped files left out); 0 where
    /proc does not say."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakAnon:
    """The peak of :func:`anon_bytes` while the block runs, sampled by a thread every ``interval`` seconds."""

    def __init__(self, interval: float = MEMORY_SAMPLE_S):
        self.interval, self.peak = interval, anon_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="rag4dmc-peak-anon")

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, anon_bytes())

    def __enter__(self) -> PeakAnon:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anon_bytes())


def plan_sizes(n_int: int, n_ext: int, dims: tuple[int, int], cfg: KBConfig) -> dict:
    """The build's sample sizes, piece size and index shards for these corpus sizes (all bounded)."""
    from rag4dmc.pipeline.core.index import choose_kind, code_bytes, train_rows

    f, a = cfg.filter, cfg.align
    k_int = f.n_clusters_internal or default_clusters(min(n_int, cfg.mapping.max_rows), 1024)
    k_ext = f.n_clusters_external or default_clusters(n_ext, EXTERNAL_CLUSTER_CAP)
    rows = n_int + n_ext
    shards = max(cfg.index.shards, math.ceil(rows / cfg.index.shard_rows))
    kind = choose_kind(rows, cfg.index, max(dims))
    return {
        "internal_sample": min(n_int, cfg.mapping.max_rows),
        "kmeans_internal": kmeans_sample_size(min(n_int, cfg.mapping.max_rows), k_int, f.points_per_centroid),
        "kmeans_external": kmeans_sample_size(n_ext, k_ext, f.points_per_centroid) if n_ext else 0,
        "align_rows": min(n_ext, a.max_rows or n_ext),
        "piece_rows": min(cfg.build.piece_rows, max(1, rows)),  # a piece never holds more rows than there are
        "shards": shards,
        "shard_rows": math.ceil(rows / shards) if rows else 0,
        "kind": kind,
        "train_rows": train_rows(rows, kind, cfg.index),
        "code_bytes": {m: code_bytes(kind, d, cfg.index) for m, d in zip(MODALITIES, dims)},
    }


def estimate_memory(n_int: int, n_ext: int, dims: tuple[int, int], cfg: KBConfig, max_shard_rows: int = 0) -> dict:
    """Peak bytes of the driver and of each kind of task, from row counts, dims and config (before starting).

    ``max_shard_rows``: the largest input layout shard (a purify task holds its kept rows as float16)."""
    s = plan_sizes(n_int, n_ext, dims, cfg)
    d_sum, d_max = sum(dims), max(dims)
    f4 = 4  # float32 bytes
    fit = (s["internal_sample"] * d_sum * f4 * 2  # internal sample, and the mapping's training copies
           + s["kmeans_external"] * d_max * f4 * 2  # one modality's external k-means sample, and its normalised copy
           + s["piece_rows"] * d_sum * f4 * 2
           + s["align_rows"] * d_max * f4 * 4)  # aligned sample, W applied, CSLS blocks
    piece = min(s["piece_rows"], max_shard_rows) if max_shard_rows else s["piece_rows"]  # pieces of one shard
    purify = piece * d_sum * f4 * 4 + max_shard_rows * d_sum * 2  # a piece's work, the part's float16
    # codes (and the add's copy), a piece as float32, the recall queries' similarities to a piece (and their
    # argpartition's int64 positions), the exact rerank's gathered candidates and their product
    # (``VectorIndex.search`` bounds the gather), the grid's answers; the float16 vectors are streamed to a file
    # and read back memory-mapped (page cache, not the task's own memory)
    index = max(s["shard_rows"] * s["code_bytes"][m] for m in MODALITIES) * 2 \
        + s["piece_rows"] * d_max * f4 * 3 + cfg.index.recall_queries * s["piece_rows"] * (f4 + 8) \
        + RERANK_GATHER_BYTES * 2 + cfg.index.recall_queries * (RECALL_K + 1) * 16 * 4
    driver = max(s["piece_rows"], max_shard_rows) * METADATA_BYTES_PER_ROW  # one part's entries at a time
    train = s["train_rows"] * d_max * f4 * 3  # the sample, its normalised copy, FAISS's k-means
    return {"driver": BASE_PROCESS_BYTES + driver, "fit": BASE_PROCESS_BYTES + fit,
            "purify": BASE_PROCESS_BYTES + purify + max_shard_rows * METADATA_BYTES_PER_ROW,
            "train": BASE_PROCESS_BYTES + train, "index": BASE_PROCESS_BYTES + index, "sizes": s}


SETTING_FOR = {"fit": "mapping.max_rows, filter.points_per_centroid, align.max_rows or build.piece_rows",
               "train": "index.train_points_per_list or index.nlist",
               "purify": "build.piece_rows (or split the input's layout shards)", "index": "index.shard_rows (more, smaller shards) or index.bytes_per_row",
               "driver": "build.piece_rows"}


def check_memory(estimate: dict, node_bytes: int, driver_bytes: int) -> None:
    """Refuse a build whose estimated task or driver peak exceeds what one node (or the driver's host) has."""
    gib = 2**30
    over = [(k, v, driver_bytes if k == "driver" else node_bytes) for k, v in estimate.items()
            if k != "sizes" and v > (driver_bytes if k == "driver" else node_bytes)]
    if over:
        raise MemoryError("; ".join(
            f"the {k} step needs about {v / gib:.1f} GiB but {'the driver host' if k == 'driver' else 'the largest node'}"
            f" has {limit / gib:.1f} GiB: lower {SETTING_FOR[k]}" for k, v, limit in over))


def spread_cpus(n_tasks: int, floor: float, node_cpus: float, cluster_cpus: float) -> float:
    """CPUs per task of a step of ``n_tasks`` parallel tasks: the cluster's CPUs shared out, at least ``floor``
    (``build.task_cpus``) and at most one node's (a single index shard gets the whole node, not one core)."""
    return max(floor, min(node_cpus, cluster_cpus // max(1, n_tasks)))


def ray_cpus() -> tuple[float, float]:
    """CPUs of the largest alive Ray node, and of the whole cluster."""
    import ray

    alive = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    return float(max(alive, default=1) or 1), float(sum(alive) or 1)


def largest_node_bytes() -> int:
    """Memory of the largest node in the Ray cluster (what one task can have at most)."""
    import ray

    return int(max((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)) or \
        host_bytes()


def host_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def fresh_worker(task_bytes: int) -> dict:
    """Ray remote arguments for a build task whose estimated peak is ``task_bytes``: ``max_calls=1`` (a fresh worker
    per task) when it needs more than ``FRESH_WORKER_ABOVE_BYTES`` beyond a bare process; none (workers are reused)
    for a smaller one."""
    return {"max_calls": 1} if task_bytes - BASE_PROCESS_BYTES > FRESH_WORKER_ABOVE_BYTES else {}
