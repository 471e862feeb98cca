"""Step 2 of the out-of-core build, purify (a streaming Ray Data pass, one task per layout shard): every external
row assigned to its cluster, dropped where the filter drops it, rotated by W; one purified part per shard, skipped
when already written (resume).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from rag4dmc.actors.resources import use_assigned_cpus
from rag4dmc.pipeline.core.knn import normalize_rows
from rag4dmc.pipeline.core.retrieval import MODALITIES
from rag4dmc.pipeline.io import embedding_layout as layout
from rag4dmc.pipeline.io.storage import url_to_fs
from rag4dmc.pipeline.kb.build_fit import Fitted, kept_mask
from rag4dmc.pipeline.kb.build_memory import peak_rss
from rag4dmc.pipeline.kb.build_sides import EXTERNAL, LOCATION_SCHEMA
from rag4dmc.pipeline.kb.store import PARTS_DIR


def purify_shard(item: dict) -> dict:
    """One layout shard -> one purified part (kept rows, rotated, float16; entries by reference); resumable."""
    side, shard, out, opts = item["side"], item["shard"], item["out"], item["storage_options"]
    fitted: Fitted = item["fitted"]
    part_root = f"{out}/{PARTS_DIR}/{side}"
    counts_uri = f"{part_root}/counts/counts_{shard.number}.json"
    fs, counts_path = url_to_fs(counts_uri, opts)
    if shard.number in layout.written_numbers(part_root, opts) and fs.exists(counts_path):
        return json.loads(fs.cat_file(counts_path)) | {"resumed": True}
    piece = fitted.cfg.build.piece_rows
    vectors = {m: [] for m in MODALITIES}
    metas, totals = [], {m: {} for m in MODALITIES}
    shard_meta = layout.read_metadata(shard, opts, extra=LOCATION_SCHEMA)  # once: its row groups may be large
    for start in range(0, shard.rows, piece):
        stop = min(shard.rows, start + piece)
        block = {m: normalize_rows(layout.read_vectors(getattr(shard, m), start, stop, opts),
                                   f"{side} {m} embeddings of shard {shard.number}") for m in MODALITIES}
        keep = np.ones(stop - start, bool)
        if side == EXTERNAL and fitted.filters is not None:
            keep, counts = kept_mask(fitted.filters, block, fitted.cfg)
            for m in MODALITIES:
                for k, v in counts[m].items():
                    totals[m][k] = totals[m].get(k, 0) + v
        for m in MODALITIES:
            x = block[m][keep]
            w = (fitted.rotations or {}).get(m) if side == EXTERNAL else None
            vectors[m].append((normalize_rows(x @ w, f"aligned {m}") if w is not None and len(x) else x)
                              .astype(np.float16))
        metas.append(shard_meta.slice(start, stop - start).filter(pa.array(keep)))
    meta = pa.concat_tables(metas) if metas else layout.METADATA_SCHEMA.empty_table()
    part_meta = pa.table({"id": meta["id"], "caption": meta["text"], "image_uri": meta["image_uri"],
                          "source": pa.array([side] * meta.num_rows, pa.string()),
                          "image_shard": meta["image_shard"], "image_row": meta["image_row"]})
    dims = {"image": shard.image_dim, "text": shard.text_dim}
    stacked = {m: np.concatenate(vectors[m]) if vectors[m] else np.zeros((0, dims[m]), np.float16)
               for m in MODALITIES}
    result = {"side": side, "number": shard.number, "rows": shard.rows, "kept": meta.num_rows,
              "filter": totals, "peak_rss": peak_rss()}
    fs.makedirs(counts_path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(counts_path, json.dumps(result).encode())  # before the metadata, which marks the part complete
    layout.write_embedding_shard(part_root, shard.number, stacked["image"], stacked["text"], part_meta, opts)
    return result


def purify_row(item: dict) -> dict:
    """Ray Data map function of the purify pass: the fitted object travels by reference."""
    import ray

    use_assigned_cpus()
    item = dict(item)
    item["fitted"] = ray.get(item["fitted"])
    result = purify_shard(item)
    result["filter"] = json.dumps(result["filter"])  # a nested dict of counts, as one column
    return result


def purification_report(fitted: Fitted, counts: list[dict]) -> dict:
    """The filter's report per modality (from the fit and the streamed counts)."""
    f = fitted.cfg.filter
    report: dict = {"filter": {}}
    for m in MODALITIES:
        model = fitted.filters[m]
        ok = model.centroid_similarity >= f.tau_cent
        summed = {k: sum(json.loads(c["filter"])[m][k] if isinstance(c["filter"], str) else c["filter"][m][k]
                         for c in counts) for k in ("instances_kept", "instances_dropped_by_cluster",
                                                     "instances_dropped_by_instance")}
        report["filter"][m] = {"n_internal_clusters": len(model.internal_centroids),
                               "n_external_clusters": len(model.external_centroids),
                               "clusters_kept": int(ok.sum()), "clusters_dropped": int((~ok).sum()), **summed,
                               "tau_cent": f.tau_cent, "tau_inst": f.tau_inst,
                               "kmeans_rows_internal": model.sample_internal,
                               "kmeans_rows_external": model.sample_external}
    kept = sum(c["kept"] for c in counts)
    report["filter"]["kept_pairs"] = kept
    report["filter"]["dropped_pairs"] = sum(c["rows"] for c in counts) - kept
    report["align"] = {**fitted.report.get("align", {}), "sample_rows": fitted.report.get("align_sample_rows")}
    return report
