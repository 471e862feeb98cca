"""Cluster filtering of the external knowledge base (RAG4DMC, Key Design 2, purification).

k-means on internal and external embeddings (FAISS's), then external clusters whose centroid is far from every
internal centroid are dropped (``tau_cent``), then instances far from the matched internal centroid
(``tau_inst``). Applied per modality before the alignment (``rag4dmc.pipeline.core.alignment``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import faiss
import numpy as np

from rag4dmc.pipeline.core.knn import (
    DEFAULT_BLOCK,
    flat_index,
    normalize_rows,
    same_dim,
    search_blocks,
)

log = logging.getLogger(__name__)

INTERNAL_CLUSTER_CAP = 1024
EXTERNAL_CLUSTER_CAP = 4096
MAX_POINTS_PER_CENTROID = 256  # FAISS's k-means bounds: 39 to 256 training points per centroid (the floor is
# FilterConfig.points_per_centroid's; a set smaller than k x 39 trains on all its rows)


def default_clusters(n: int, cap: int) -> int:
    """About sqrt(n) clusters, at least 1 and at most ``cap``."""
    return int(max(1, min(cap, round(math.sqrt(n)))))


def kmeans_sample_size(n: int, k: int, points_per_centroid: int = MAX_POINTS_PER_CENTROID) -> int:
    """Rows k-means trains on: at most ``points_per_centroid`` per centroid (FAISS's bounds are 39 to 256)."""
    return min(n, k * points_per_centroid)


def sample_ids(n: int, size: int, seed: int | tuple[int, ...]) -> np.ndarray:
    """``size`` distinct row ids of [0, n) drawn uniformly at random, sorted (all rows when size >= n); ``seed``
    as numpy's ``default_rng`` takes it."""
    if size >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False)).astype(np.int64)


def kmeans(x: np.ndarray, k: int, niter: int = 20, seed: int = 0, nredo: int = 3) -> np.ndarray:
    """Unit-norm centroids of spherical k-means (FAISS, best of ``nredo`` starts) on every row of x; k is clamped."""
    k = min(k, len(x))
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, nredo=nredo, verbose=False,
                      min_points_per_centroid=1,  # small sets are legitimate; FAISS would warn
                      max_points_per_centroid=max(1, -(-len(x) // k)))  # the caller sampled: FAISS must not again
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return normalize_rows(km.centroids, "centroids")


@dataclass
class FilterReport:
    """Clusters and instances kept or dropped by cluster_filter()."""

    n_internal_clusters: int
    n_external_clusters: int
    clusters_kept: int
    clusters_dropped: int
    instances_kept: int
    instances_dropped_by_cluster: int
    instances_dropped_by_instance: int
    tau_cent: float
    tau_inst: float
    kmeans_rows_internal: int = 0  # rows each side's k-means trained on (random samples)
    kmeans_rows_external: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FilterResult:
    keep: np.ndarray  # bool [n_external]
    report: FilterReport
    cluster_of: np.ndarray  # external cluster of each row
    centroid_similarity: np.ndarray  # cos(external centroid, matched internal centroid), per cluster
    instance_similarity: np.ndarray  # cos(row, matched internal centroid of its cluster)
    model: FilterModel | None = None


def threshold(centroid_similarity: np.ndarray, cluster_of: np.ndarray, instance_similarity: np.ndarray,
              tau_cent: float, tau_inst: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """keep = cos(c_ext(x), c_int*) >= tau_cent and cos(x, c_int*) >= tau_inst; also (by_cluster, by_instance).

    The thresholds only cut similarities k-means already gave, so several can be tried on one clustering."""
    by_cluster = ~(centroid_similarity >= tau_cent)[cluster_of]
    by_instance = ~by_cluster & (instance_similarity < tau_inst)
    return ~(by_cluster | by_instance), by_cluster, by_instance


@dataclass(frozen=True)
class FilterModel:
    """What the filter's k-means fitted: both sides' centroids and, per external cluster, its matched internal
    centroid and their cosine. Applied to any block of external rows (:meth:`assign`), so the assignment of a
    corpus of any size streams."""

    internal_centroids: np.ndarray
    external_centroids: np.ndarray
    centroid_similarity: np.ndarray  # cos(c_ext, c_int*) per external cluster
    matched: np.ndarray  # index of c_int* per external cluster
    sample_internal: int  # rows k-means was trained on, per side
    sample_external: int

    def assign(self, external: np.ndarray, block_size: int = DEFAULT_BLOCK) -> tuple[np.ndarray, np.ndarray]:
        """(cluster_of, instance_similarity) of each row: its nearest external centroid, cos(x, c_int*)."""
        x = normalize_rows(external, "external")
        _, cluster_of = search_blocks(flat_index(self.external_centroids), x, 1, block_size)
        cluster_of = cluster_of[:, 0]
        inst_sim = np.einsum("nd,nd->n", x, self.internal_centroids[self.matched[cluster_of]])
        return cluster_of, inst_sim

    def threshold(self, external: np.ndarray, tau_cent: float, tau_inst: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(keep, by_cluster, by_instance) of a block of rows at these thresholds (:func:`threshold`)."""
        cluster_of, inst_sim = self.assign(external)
        return threshold(self.centroid_similarity, cluster_of, inst_sim, tau_cent, tau_inst)


def fit_filter(
    internal: np.ndarray,
    external_sample: np.ndarray,
    n_external: int,
    *,
    n_clusters_internal: int | None = None,
    n_clusters_external: int | None = None,
    points_per_centroid: int = MAX_POINTS_PER_CENTROID,
    niter: int = 20,
    nredo: int = 3,
    seed: int = 0,
    block_size: int = DEFAULT_BLOCK,
) -> FilterModel:
    """k-means of both sides on random samples of at most ``points_per_centroid`` rows per centroid.

    ``external_sample`` holds rows :func:`external_sample_ids` drew from the ``n_external`` external rows
    (all of them when the corpus is small); the number of external clusters is chosen from ``n_external``.
    """
    internal = normalize_rows(internal, "internal")
    external_sample = normalize_rows(external_sample, "external")
    same_dim(internal, external_sample, ("internal", "external"))
    k_int = n_clusters_internal or default_clusters(len(internal), INTERNAL_CLUSTER_CAP)
    k_ext = n_clusters_external or default_clusters(n_external, EXTERNAL_CLUSTER_CAP)
    int_rows = sample_ids(len(internal), kmeans_sample_size(len(internal), k_int, points_per_centroid), seed)
    c_int = kmeans(internal[int_rows], k_int, niter, seed, nredo)
    c_ext = kmeans(external_sample, k_ext, niter, seed, nredo)
    cent_sim, matched = search_blocks(flat_index(c_int), c_ext, 1, block_size)
    return FilterModel(c_int, c_ext, cent_sim[:, 0], matched[:, 0], len(int_rows), len(external_sample))


def external_sample_ids(n_external: int, n_clusters_external: int | None, points_per_centroid: int,
                        seed: int) -> np.ndarray:
    """The external rows the filter's k-means trains on: a uniform random sample, never the first rows."""
    k_ext = n_clusters_external or default_clusters(n_external, EXTERNAL_CLUSTER_CAP)
    return sample_ids(n_external, kmeans_sample_size(n_external, k_ext, points_per_centroid), seed)


def filter_report(model: FilterModel, cluster_of: np.ndarray, inst_sim: np.ndarray, tau_cent: float,
                  tau_inst: float) -> tuple[np.ndarray, FilterReport]:
    """The kept mask of assigned rows and the report counting clusters and instances kept or dropped."""
    keep, by_cluster, by_instance = threshold(model.centroid_similarity, cluster_of, inst_sim, tau_cent, tau_inst)
    cluster_ok = model.centroid_similarity >= tau_cent
    return keep, FilterReport(
        n_internal_clusters=len(model.internal_centroids),
        n_external_clusters=len(model.external_centroids),
        clusters_kept=int(cluster_ok.sum()),
        clusters_dropped=int((~cluster_ok).sum()),
        instances_kept=int(keep.sum()),
        instances_dropped_by_cluster=int(by_cluster.sum()),
        instances_dropped_by_instance=int(by_instance.sum()),
        tau_cent=tau_cent,
        tau_inst=tau_inst,
        kmeans_rows_internal=model.sample_internal,
        kmeans_rows_external=model.sample_external,
    )


def cluster_filter(
    internal: np.ndarray,
    external: np.ndarray,
    *,
    tau_cent: float = 0.5,
    tau_inst: float = 0.3,
    n_clusters_internal: int | None = None,
    n_clusters_external: int | None = None,
    points_per_centroid: int = MAX_POINTS_PER_CENTROID,
    niter: int = 20,
    nredo: int = 3,
    seed: int = 0,
    block_size: int = DEFAULT_BLOCK,
) -> FilterResult:
    """Keep external rows whose cluster centroid and own embedding are near the matched internal centroid.

    In memory: :func:`fit_filter` on the sampled rows, then :meth:`FilterModel.assign` of every row (the
    out-of-core build runs the same two steps, the second one streaming)."""
    external = normalize_rows(external, "external")
    ids = external_sample_ids(len(external), n_clusters_external, points_per_centroid, seed)
    model = fit_filter(internal, external[ids], len(external), n_clusters_internal=n_clusters_internal,
                       n_clusters_external=n_clusters_external, points_per_centroid=points_per_centroid,
                       niter=niter, nredo=nredo, seed=seed, block_size=block_size)
    cluster_of, inst_sim = model.assign(external, block_size)
    keep, report = filter_report(model, cluster_of, inst_sim, tau_cent, tau_inst)
    log.info("cluster filter: %s", report)
    return FilterResult(keep, report, cluster_of, model.centroid_similarity, inst_sim, model)
