"""Build a knowledge base in memory from embedding matrices: for corpora that fit in memory (the evaluation, the
demo, tests). ``rag4dmc kb build`` builds out of core (``rag4dmc.pipeline.kb.build``) with the same purification
(``rag4dmc.pipeline.kb.purification``) and the same manifest (``rag4dmc.pipeline.kb.store``).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa

from rag4dmc.pipeline.config import KBConfig
from rag4dmc.pipeline.core.cluster_filter import sample_ids
from rag4dmc.pipeline.core.knn import EmbeddingError, normalize_rows
from rag4dmc.pipeline.core.mapping import train_mapping
from rag4dmc.pipeline.core.retrieval import MODALITIES
from rag4dmc.pipeline.kb import store as kb_store
from rag4dmc.pipeline.kb.calibrate import calibrate
from rag4dmc.pipeline.kb.knowledge_base import KnowledgeBase
from rag4dmc.pipeline.kb.purification import build_shards, purify_external

log = logging.getLogger(__name__)


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


def _texts(table: pa.Table) -> list[str]:
    return [t or "" for t in table.column("text").to_pylist()]


def _images(table: pa.Table) -> pa.ChunkedArray | None:
    return table.column("image") if "image" in table.column_names else None


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
