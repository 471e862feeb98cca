"""The purified dual knowledge base in memory: build it from embedding matrices, query it.

The in-memory build serves the evaluation and the calibration (corpora that fit in memory). ``rag4dmc kb
build`` runs the out-of-core build (``rag4dmc.pipeline.kb.build``) with the same purification math; storage is
``rag4dmc.pipeline.kb.store``. A KB's shards hold both modalities of the same row range, so a retrieval actor that
holds one shard computes both fusion terms (intra and cross) of its own candidates; shards merge by the
intra score (stage 1), and the fused rerank (stage 2) runs on the merged candidates.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from rag4dmc.pipeline.config import KBConfig, RetrievalConfig
from rag4dmc.pipeline.core.alignment import AlignResult, align_candidate_ids, align_with_report, first_kept
from rag4dmc.pipeline.core.cluster_filter import FilterResult, cluster_filter, sample_ids, threshold
from rag4dmc.pipeline.core.index import build_shards as index_shards
from rag4dmc.pipeline.core.index import choose_kind
from rag4dmc.pipeline.core.knn import EmbeddingError, normalize_rows
from rag4dmc.pipeline.core.mapping import CrossModalMapper, train_mapping
from rag4dmc.pipeline.core.retrieval import MODALITIES, Neighbours, Shard, search
from rag4dmc.pipeline.kb import store as kb_store
from rag4dmc.pipeline.kb.calibrate import calibrate

log = logging.getLogger(__name__)



@dataclass
class KnowledgeBase:
    entries: pa.Table  # id, source, text, image
    mapping: CrossModalMapper
    shards: list[Shard]
    report: dict
    manifest: dict = field(default_factory=dict)

    @property
    def version(self) -> str:
        return self.manifest["version"]

    def __len__(self) -> int:
        return self.entries.num_rows

    def pseudo(self, query: np.ndarray, observed: str) -> np.ndarray:
        """z_hat of the missing modality from the observed one (the mapping MLP)."""
        return self.mapping.image_to_text(query) if observed == "image" else self.mapping.text_to_image(query)

    def retrieve(self, query: np.ndarray, observed: str, cfg: RetrievalConfig = RetrievalConfig()) -> Neighbours:
        """Two-stage fusion retrieval of each query row against every shard, merged."""
        return search(self.shards, query, self.pseudo(query, observed), observed, cfg)


# ------------------------------------------------------------------------------------------------
# Building
# ------------------------------------------------------------------------------------------------


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


def purify_external(
    internal: dict[str, np.ndarray], external: dict[str, np.ndarray], cfg: KBConfig
) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    """Cluster-filter then align the external embeddings per modality; returns (kept mask, aligned, report)."""
    filt = filter_external(internal, external, cfg)
    keep = filt["keep"]
    aligned, results = align_external(internal, external, keep, cfg)
    report = {"filter": filt["report"], "align": {
        m: {"skipped": "fewer than 2 external rows left after filtering"} if r is None else r.report.to_dict()
        for m, r in results.items()}}
    return keep, {m: aligned[m][keep] for m in MODALITIES}, report


def build_knowledge_base(
    internal_entries: pa.Table,
    internal: dict[str, np.ndarray],
    external_entries: pa.Table | None = None,
    external: dict[str, np.ndarray] | None = None,
    cfg: KBConfig = KBConfig(),
    encoder_info: dict | None = None,
) -> KnowledgeBase:
    """Train the mapping on internal pairs, purify the external part, and index everything.

    ``*_entries`` hold id, text and image (bytes) per row; ``internal`` / ``external`` map "image" and
    "text" to row-aligned embeddings of those rows.
    """
    t0 = time.perf_counter()
    internal = {m: normalize_rows(internal[m], f"internal {m} embeddings") for m in MODALITIES}
    if len(internal["image"]) != len(internal["text"]) or len(internal["image"]) != internal_entries.num_rows:
        raise EmbeddingError("internal entries, image and text embeddings must have the same number of rows")
    use_external = cfg.use_external and external_entries is not None and external_entries.num_rows > 0
    if use_external:
        external = {m: normalize_rows(external[m], f"external {m} embeddings") for m in MODALITIES}
    calibration = None
    if cfg.calibration.enabled:
        calibration = calibrate(
            _texts(internal_entries), _images(internal_entries), internal,
            _texts(external_entries) if use_external else None, _images(external_entries) if use_external else None,
            external if use_external else None, cfg)
        if calibration is not None and calibration["purification"] is not None:
            chosen = calibration["purification"]  # the final build purifies with the chosen settings
            cfg = cfg.model_copy(update={"filter": cfg.filter.model_copy(update=chosen["filter"]),
                                         "align": cfg.align.model_copy(update=chosen["align"])})
    rows = sample_ids(len(internal["image"]), cfg.mapping.max_rows, cfg.mapping.seed)  # all of a small set
    mapping, map_report = train_mapping(internal["image"][rows], internal["text"][rows], cfg.mapping)
    report: dict = {"mapping": map_report.to_dict(), "internal_rows": internal_entries.num_rows}

    tables = [_entries(internal_entries, "internal")]
    vectors = {m: [internal[m]] for m in MODALITIES}
    if use_external:
        report["external_rows"] = external_entries.num_rows
        if cfg.purify:
            # fitted on the mapping's sample of the internal pairs, as the out-of-core build fits them
            keep, aligned, purification = purify_external({m: internal[m][rows] for m in MODALITIES}, external, cfg)
            report.update(purification)
        else:
            keep, aligned = np.ones(external_entries.num_rows, bool), external
            report["purification"] = "disabled"
        tables.append(_entries(external_entries.filter(pa.array(keep)), "external"))
        for m in MODALITIES:
            vectors[m].append(aligned[m])
    entries = pa.concat_tables(tables)
    full = {m: np.ascontiguousarray(np.concatenate(vectors[m]), dtype=np.float32) for m in MODALITIES}
    shards = build_shards(full, cfg)
    report["kb_rows"] = entries.num_rows
    report["index_kind"] = shards[0].image.kind
    report["calibration"] = calibration if calibration is not None else (
        "disabled" if not cfg.calibration.enabled else "skipped: too few internal pairs to hold any out")
    report["build_seconds"] = round(time.perf_counter() - t0, 3)
    manifest = kb_store.new_manifest(
        encoder=encoder_info or {}, rows=entries.num_rows, dims=(full["image"].shape[1], full["text"].shape[1]),
        cfg=cfg, calibration=calibration, shards=[{"start": s.start, "stop": s.stop, "path": kb_store.shard_dir(i)}
                                                  for i, s in enumerate(shards)],
        content=[np.ascontiguousarray(full[m]).tobytes() for m in MODALITIES])
    log.info("knowledge base %s: %d rows (%s)", manifest["version"], entries.num_rows, report.get("filter", {}))
    return KnowledgeBase(entries, mapping, shards, report, manifest)


def calibration_summary(calibration: dict | None) -> dict | None:
    """What the manifest keeps of a calibration: the chosen settings per direction and their fidelity beside
    the default's (the full grids stay in report.json)."""
    if calibration is None:
        return None
    keep = ("retrieval", "selection", "fidelity", "ci", "cross_fitted_fidelity", "gain_over_default",
            "gain_over_default_ci")
    out = {"holdout_pairs": calibration["holdout_pairs"],
           "directions": {t: {k: d.get(k) for k in keep} | {"default_fidelity": (d["default"] or {}).get("fidelity"),
                                                             "top1_fidelity": (d["top1"] or {}).get("fidelity")}
                          for t, d in calibration["directions"].items()}}
    if calibration["purification"] is not None:
        out["purification"] = {k: calibration["purification"][k] for k in ("filter", "align", "fidelity",
                                                                            "default_fidelity", "internal_only_fidelity")}
    return out


def _texts(table: pa.Table) -> list[str]:
    return [t or "" for t in table.column("text").to_pylist()]


def _images(table: pa.Table) -> pa.ChunkedArray | None:
    return table.column("image") if "image" in table.column_names else None


def build_shards(vectors: dict[str, np.ndarray], cfg: KBConfig) -> list[Shard]:
    """The KB's shards: the same row ranges of both modalities (``index.build_shards``), one Shard per range."""
    kind = choose_kind(len(vectors["image"]), cfg.index, max(v.shape[1] for v in vectors.values()))
    image, text = (index_shards(vectors[m], cfg.index, kind=kind) for m in MODALITIES)
    return [Shard(i.offset, i.offset + len(i), i, t) for i, t in zip(image, text)]


def _entries(table: pa.Table, source: str) -> pa.Table:
    """id, source, text, image bytes (in memory only) and where the image is, when the table says so."""
    n = table.num_rows
    cols = {
        "id": table.column("id").cast(pa.string()),
        "source": pa.array([source] * n, pa.string()),
        "text": table.column("text").cast(pa.string()),
        "image": table.column("image").cast(pa.binary()) if "image" in table.column_names
        else pa.nulls(n, pa.binary()),
    }
    for name, typ in (("image_uri", pa.string()), ("image_shard", pa.string()), ("image_row", pa.int64())):
        cols[name] = table.column(name).cast(typ) if name in table.column_names else pa.nulls(n, typ)
    return pa.table(cols)
