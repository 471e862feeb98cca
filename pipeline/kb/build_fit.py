"""Step 1 of the out-of-core build, fit (one Ray task): the mapping MLP on internal pairs, the cluster filter's k-means
on both sides and the CSLS/Procrustes rotation W, all on bounded random samples (the calibration runs on the same
samples); and its resume: a build of the same inputs and config reuses a saved fit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from rag4dmc.pipeline.config import ColumnsConfig, ConfigError, KBConfig
from rag4dmc.pipeline.core.alignment import align_candidate_ids, align_with_report, first_kept
from rag4dmc.pipeline.core.cluster_filter import (
    external_sample_ids,
    fit_filter,
    sample_ids,
)
from rag4dmc.pipeline.core.retrieval import MODALITIES
from rag4dmc.pipeline.io import embedding_layout as layout
from rag4dmc.pipeline.io.kb_images import ExampleImages
from rag4dmc.pipeline.io.storage import url_to_fs
from rag4dmc.pipeline.kb.build_memory import peak_rss
from rag4dmc.pipeline.kb.build_sides import LOCATION_SCHEMA, Side
from rag4dmc.pipeline.kb.store import PARTS_DIR, json_default

log = logging.getLogger(__name__)

@dataclass
class Fitted:
    """What the fit step hands the streaming passes: small, whatever the corpus size."""

    mapping: object  # CrossModalMapper
    filters: dict | None  # modality -> FilterModel (None: no external part or purification off)
    rotations: dict | None  # modality -> W (None where alignment was skipped)
    cfg: KBConfig  # with the calibration's chosen purification settings
    report: dict
    calibration: dict | None
    peak_rss: int = 0


def kept_mask(filters: dict, block: dict[str, np.ndarray], cfg: KBConfig) -> tuple[np.ndarray, dict]:
    """keep of each row (both modalities' filters, or the configured one), and per-modality drop counts."""
    f = cfg.filter
    masks, counts = {}, {}
    for m in MODALITIES:
        keep, by_cluster, by_instance = filters[m].threshold(block[m], f.tau_cent, f.tau_inst)
        masks[m] = keep
        counts[m] = {"instances_kept": int(keep.sum()), "instances_dropped_by_cluster": int(by_cluster.sum()),
                     "instances_dropped_by_instance": int(by_instance.sum())}
    keep = masks["image"] & masks["text"] if f.modality == "both" else masks[f.modality]
    return keep, counts


def fit(internal: Side, external: Side | None, cfg: KBConfig, storage_options: dict | None,
        columns: dict | None = None) -> Fitted:
    """Step 1, run as one task: everything the streaming passes need, fitted on bounded random samples.
    ``columns``: the input data's columns (``ColumnsConfig``), where the calibration finds a row's image."""
    from rag4dmc.pipeline.core.mapping import train_mapping
    from rag4dmc.pipeline.kb.calibrate import calibrate

    t0 = time.perf_counter()
    int_ids = sample_ids(internal.rows, cfg.mapping.max_rows, cfg.mapping.seed)
    inner = {m: internal.read(int_ids, m, storage_options) for m in MODALITIES}
    report: dict = {"internal_rows": internal.rows, "internal_sample_rows": len(int_ids)}
    use_external = external is not None and external.rows > 0 and cfg.use_external
    calibration = None
    if cfg.calibration.enabled:
        ext_cal = ext_texts = ext_images = None
        images = ExampleImages(storage_options, columns=ColumnsConfig(**(columns or {})))
        if use_external:
            cal_ids = sample_ids(external.rows, cfg.calibration.max_rows, cfg.calibration.seed)
            ext_cal = {m: external.read(cal_ids, m, storage_options) for m in MODALITIES}
            ext_texts, ext_images = read_texts_and_images(external, cal_ids, storage_options, images)
        int_texts, int_images = read_texts_and_images(internal, int_ids, storage_options, images)
        calibration = calibrate(int_texts, int_images, inner, ext_texts, ext_images, ext_cal, cfg)
        report["calibration_images"] = images.stats()
        if calibration is not None and calibration["purification"] is not None:
            chosen = calibration["purification"]
            cfg = cfg.model_copy(update={"filter": cfg.filter.model_copy(update=chosen["filter"]),
                                         "align": cfg.align.model_copy(update=chosen["align"])})
    mapping, map_report = train_mapping(inner["image"], inner["text"], cfg.mapping)
    report["mapping"] = map_report.to_dict()
    filters = rotations = None
    if use_external and cfg.purify:
        f = cfg.filter
        ext_ids = external_sample_ids(external.rows, f.n_clusters_external, f.points_per_centroid, f.seed)
        filters = {}
        for m in MODALITIES:  # one modality's sample in memory at a time
            filters[m] = fit_filter(inner[m], external.read(ext_ids, m, storage_options), external.rows,
                                    n_clusters_internal=f.n_clusters_internal,
                                    n_clusters_external=f.n_clusters_external,
                                    points_per_centroid=f.points_per_centroid, niter=f.niter, nredo=f.nredo,
                                    seed=f.seed, block_size=cfg.align.block_size)
        rotations, report["align"], report["align_sample_rows"] = _fit_rotations(inner, external, filters, cfg,
                                                                                 storage_options)
    report["fit_seconds"] = round(time.perf_counter() - t0, 3)
    return Fitted(mapping, filters, rotations, cfg, report, calibration, peak_rss())


def alignment_rows(external: Side, filters: dict, cfg: KBConfig, storage_options: dict | None) -> np.ndarray:
    """The external rows W is fitted on: the first ``align.max_rows`` kept ones of a random order, read in pieces."""
    a = cfg.align
    candidates = align_candidate_ids(external.rows, a.max_rows, a.seed)
    kept, found = [], 0
    for start in range(0, len(candidates), cfg.build.piece_rows):
        piece = candidates[start:start + cfg.build.piece_rows]
        keep, _ = kept_mask(filters, {m: external.read(piece, m, storage_options) for m in MODALITIES}, cfg)
        kept.append(keep)
        found += int(keep.sum())
        if a.max_rows is not None and found >= a.max_rows:
            break
    mask = np.concatenate(kept) if kept else np.zeros(0, bool)
    return first_kept(candidates[:len(mask)], mask, a.max_rows)


def _fit_rotations(inner: dict, external: Side, filters: dict, cfg: KBConfig,
                   storage_options: dict | None) -> tuple[dict, dict, int]:
    rows = alignment_rows(external, filters, cfg, storage_options)
    a = cfg.align
    rotations, report = {}, {}
    for m in MODALITIES:
        if len(rows) < 2:
            rotations[m], report[m] = None, {"skipped": "fewer than 2 external rows left after filtering"}
            continue
        result = align_with_report(
            inner[m], external.read(rows, m, storage_options), k=a.csls_k, max_rounds=a.max_rounds, eps=a.eps,
            init=a.init, criterion_pairs=a.criterion_pairs, max_rows=a.max_rows, proximal=a.proximal, pick=a.pick,
            seed=a.seed, block_size=a.block_size)
        rotations[m], report[m] = result.W, result.report.to_dict()
    return rotations, report, len(rows)


def read_texts_and_images(side: Side, ids: np.ndarray, storage_options: dict | None, images: ExampleImages
                          ) -> tuple[list[str], Callable[[int], bytes | None]]:
    """Texts of side-global row ids in their order (for the calibration's BLEU), from the metadata row groups that
    hold them; and a reader of the i-th row's image by reference, asked only for the candidates NIQE scores."""
    ids = np.asarray(ids, np.int64)
    texts, where = np.empty(len(ids), object), np.empty((len(ids), 3), object)
    offsets = side.offsets
    for i, shard in enumerate(side.shards):
        found = np.flatnonzero((ids >= offsets[i]) & (ids < offsets[i + 1]))
        if len(found):
            meta = layout.read_metadata(shard, storage_options, rows=ids[found] - offsets[i], extra=LOCATION_SCHEMA)
            texts[found] = [t or "" for t in meta.column("text").to_pylist()]
            for j, c in enumerate(("image_uri", "image_shard", "image_row")):
                where[found, j] = meta.column(c).to_pylist()
    return texts.tolist(), lambda i: images.get(*where[i])[0]


def fingerprint(internal: Side, external: Side | None, cfg: KBConfig) -> str:
    """What the purified parts depend on: the inputs' shards and the config (not how the build runs)."""
    sides = [(s.name, s.root, [(sh.number, sh.rows) for sh in s.shards]) for s in (internal, external) if s]
    payload = {"sides": sides, "cfg": cfg.model_dump(mode="json", exclude={"build"})}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


FIT_ARRAYS, FIT_META = "fitted.safetensors", "fit.json"  # the saved fit: its arrays, and everything else as JSON
PICKLED_FIT = "fitted.pkl"  # the pickle an older rag4dmc saved the fit as: refused, never loaded
FILTER_ARRAYS = ("internal_centroids", "external_centroids", "centroid_similarity", "matched")


class UnsafeFitFile(ConfigError):
    """A KB folder holds a pickled fit: loading it could run any code whoever wrote the folder put in it."""


def resumed_fit(out: str, key: str, storage_options: dict | None) -> Fitted | None:
    """The fit of an interrupted build of the same inputs and config; otherwise its leftover parts are cleared.
    A pickled fit (an older rag4dmc's) is refused, never unpickled: the KB's folder is often a shared bucket."""
    fs, path = url_to_fs(f"{out}/{PARTS_DIR}", storage_options)
    if fs.exists(f"{path}/{PICKLED_FIT}"):
        raise UnsafeFitFile(
            f"{out}/{PARTS_DIR}/{PICKLED_FIT} is an interrupted build's fit saved as a pickle by an older rag4dmc; "
            f"it is not loaded (unpickling runs whatever code the file holds). Remove {out}/{PARTS_DIR} and run "
            "kb build again: the fit is recomputed from the inputs")
    try:
        meta = json.loads(fs.cat_file(f"{path}/{FIT_META}"))
        if meta["fingerprint"] == key:
            from safetensors.numpy import load as safetensors_load

            return fit_from_arrays(meta, safetensors_load(fs.cat_file(f"{path}/{FIT_ARRAYS}")))
    except (FileNotFoundError, KeyError, ValueError, TypeError):
        pass
    if fs.exists(path):
        log.info("removing the parts of an interrupted build of other inputs or settings at %s", path)
        fs.rm(path, recursive=True)
    return None


def save_fit(out: str, key: str, fitted: Fitted, storage_options: dict | None) -> None:
    """Keep the fit beside the parts, so a resumed build purifies its remaining shards with the same W: its arrays
    as safetensors and the rest as JSON (data only, nothing a loader would run)."""
    from safetensors.numpy import save as safetensors_save

    meta, arrays = fit_to_arrays(fitted)
    fs, path = url_to_fs(f"{out}/{PARTS_DIR}", storage_options)
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(f"{path}/{FIT_ARRAYS}", safetensors_save(arrays))
    fs.pipe_file(f"{path}/{FIT_META}", json.dumps({"fingerprint": key, **meta}, default=json_default).encode())  # last


def fit_to_arrays(fitted: Fitted) -> tuple[dict, dict[str, np.ndarray]]:
    """A fit as JSON-able settings and named arrays."""
    arrays = {f"mapping/{k}": v for k, v in fitted.mapping.arrays().items()}
    filters = {}
    for m, f in (fitted.filters or {}).items():
        arrays.update({f"filter/{m}/{name}": getattr(f, name) for name in FILTER_ARRAYS})
        filters[m] = {"sample_internal": f.sample_internal, "sample_external": f.sample_external}
    rotations = {}
    for m, w in (fitted.rotations or {}).items():
        rotations[m] = w is not None
        if w is not None:
            arrays[f"rotation/{m}"] = w
    meta = {"mapping_arch": fitted.mapping.arch(), "filters": filters if fitted.filters is not None else None,
            "rotations": rotations if fitted.rotations is not None else None,
            "cfg": fitted.cfg.model_dump(mode="json"), "report": fitted.report, "calibration": fitted.calibration,
            "peak_rss": fitted.peak_rss}
    return meta, {k: np.ascontiguousarray(v) for k, v in arrays.items()}


def fit_from_arrays(meta: dict, arrays: dict[str, np.ndarray]) -> Fitted:
    """The fit :func:`fit_to_arrays` wrote."""
    from rag4dmc.pipeline.core.cluster_filter import FilterModel
    from rag4dmc.pipeline.core.mapping import CrossModalMapper

    mapping = CrossModalMapper.from_arrays(meta["mapping_arch"], {k.split("/", 1)[1]: v for k, v in arrays.items()
                                                                  if k.startswith("mapping/")})
    filters = None if meta["filters"] is None else {
        m: FilterModel(**{name: arrays[f"filter/{m}/{name}"] for name in FILTER_ARRAYS}, **sizes)
        for m, sizes in meta["filters"].items()}
    rotations = None if meta["rotations"] is None else {
        m: arrays[f"rotation/{m}"] if present else None for m, present in meta["rotations"].items()}
    return Fitted(mapping, filters, rotations, KBConfig.model_validate(meta["cfg"]), meta["report"],
                  meta["calibration"], meta["peak_rss"])


