"""The purification step over both modalities, from a KB's configuration (RAG4DMC, Key Design 2): the cluster
filter's keep mask, the alignment's rotations, and the KB's shards over both modalities, all in memory: the
calibration (``rag4dmc.pipeline.kb.calibrate``) scores candidate settings with them on its samples, and the build's
fit and purify pass (``rag4dmc.pipeline.kb.build_fit``, ``build_purify``) stream the same math; which is in
``rag4dmc.pipeline.core.cluster_filter`` and ``rag4dmc.pipeline.core.alignment``.
"""

from __future__ import annotations

import numpy as np

from rag4dmc.pipeline.config import KBConfig
from rag4dmc.pipeline.core.alignment import AlignResult, align_candidate_ids, align_with_report, first_kept
from rag4dmc.pipeline.core.cluster_filter import FilterResult, cluster_filter, threshold
from rag4dmc.pipeline.core.index import build_shards as index_shards
from rag4dmc.pipeline.core.index import choose_kind
from rag4dmc.pipeline.core.knn import normalize_rows
from rag4dmc.pipeline.core.retrieval import MODALITIES, Shard


def filter_external(internal: dict[str, np.ndarray], external: dict[str, np.ndarray], cfg: KBConfig) -> dict:
    """k-means cluster filter per modality: ``keep`` (the pairs kept), ``results`` per modality, ``report``."""
    f = cfg.filter
    results = {m: cluster_filter(internal[m], external[m], tau_cent=f.tau_cent, tau_inst=f.tau_inst,
                                 n_clusters_internal=f.n_clusters_internal, n_clusters_external=f.n_clusters_external,
                                 points_per_centroid=f.points_per_centroid, niter=f.niter, nredo=f.nredo,
                                 seed=f.seed) for m in MODALITIES}
    keep = threshold_filter(results, f.tau_cent, f.tau_inst, f.modality)
    report = {m: results[m].report.to_dict() for m in MODALITIES}
    report["kept_pairs"], report["dropped_pairs"] = int(keep.sum()), int((~keep).sum())
    return {"keep": keep, "results": results, "report": report}


def threshold_filter(results: dict[str, FilterResult], tau_cent: float, tau_inst: float, modality: str) -> np.ndarray:
    """The external pairs kept at these thresholds, from the filter's clusterings (no k-means rerun)."""
    masks = {m: threshold(r.centroid_similarity, r.cluster_of, r.instance_similarity, tau_cent, tau_inst)[0]
             for m, r in results.items()}
    return masks["image"] & masks["text"] if modality == "both" else masks[modality]


def align_external(internal: dict[str, np.ndarray], external: dict[str, np.ndarray], keep: np.ndarray,
                   cfg: KBConfig) -> tuple[dict[str, np.ndarray], dict[str, AlignResult | None]]:
    """W per modality fitted on a random sample of the kept external rows (``alignment.first_kept``, as the
    out-of-core build draws it); every external row rotated (``external @ W``)."""
    a = cfg.align
    candidates = align_candidate_ids(len(keep), a.max_rows, a.seed)
    rows = first_kept(candidates, keep[candidates], a.max_rows)
    aligned, results = {}, {}
    for m in MODALITIES:
        if len(rows) < 2:
            aligned[m], results[m] = external[m], None
            continue
        results[m] = align_with_report(
            internal[m], external[m][rows], k=a.csls_k, max_rounds=a.max_rounds, eps=a.eps, init=a.init,
            criterion_pairs=a.criterion_pairs, max_rows=a.max_rows, proximal=a.proximal, pick=a.pick, seed=a.seed,
            block_size=a.block_size,
        )
        aligned[m] = normalize_rows(external[m] @ results[m].W, f"aligned external {m}")
    return aligned, results


def build_shards(vectors: dict[str, np.ndarray], cfg: KBConfig) -> list[Shard]:
    """The KB's shards: the same row ranges of both modalities (``index.build_shards``), one Shard per range."""
    kind = choose_kind(len(vectors["image"]), cfg.index, max(v.shape[1] for v in vectors.values()))
    image, text = (index_shards(vectors[m], cfg.index, kind=kind) for m in MODALITIES)
    return [Shard(i.offset, i.offset + len(i), i, t) for i, t in zip(image, text)]
