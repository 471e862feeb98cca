"""The purified dual knowledge base: build it from embeddings, persist it, load it, query it.

Layout of a knowledge base folder (local or object storage)::

    manifest.json      version, encoder, counts, config, shard list
    entries.arrow      one row per KB entry: id, source (internal/external), text, image bytes, as an
                       uncompressed Arrow IPC file, memory-mapped by its readers: a completion actor
                       touches only the pages of the rows its queries retrieved
    mapping.pt         the bidirectional image<->text MLP
    report.json        purification report: cluster filter and alignment per modality, mapping
    shard-00000/       rows [start, stop): image.* and text.* VectorIndex folders

A shard holds both modalities of the same row range, so a retrieval actor that holds one shard can
compute both fusion terms (intra and cross) of its own candidates; shards merge by the intra score
(stage 1), and the fused rerank (stage 2) runs on the merged candidates.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.calibrate import calibrate
from pipeline.config import KBConfig, RetrievalConfig
from pipeline.index import VectorIndex, choose_kind
from pipeline.index import build_shards as index_shards
from pipeline.knn import EmbeddingError, normalize_rows
from pipeline.mapping import CrossModalMapper, train_mapping
from pipeline.purify import AlignResult, FilterResult, align_with_report, cluster_filter, threshold
from pipeline.retrieval import MODALITIES, Neighbours, Shard, search

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: entries.arrow (memory-mapped) replaced entries.parquet
ENTRIES_FILE = "entries.arrow"
ENTRIES_BATCH_ROWS = 4096  # rows per IPC record batch of entries.arrow


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
                                 niter=f.niter, nredo=f.nredo, seed=f.seed) for m in MODALITIES}
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
    """W per modality fitted on the kept external rows; every external row rotated (``external @ W``)."""
    aligned, results = {}, {}
    for m in MODALITIES:
        if keep.sum() < 2:
            aligned[m], results[m] = external[m], None
            continue
        a = cfg.align
        results[m] = align_with_report(
            internal[m], external[m][keep], k=a.csls_k, max_rounds=a.max_rounds, eps=a.eps, init=a.init,
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
    mapping, map_report = train_mapping(internal["image"], internal["text"], cfg.mapping)  # on every pair
    report: dict = {"mapping": map_report.to_dict(), "internal_rows": internal_entries.num_rows}

    tables = [_entries(internal_entries, "internal")]
    vectors = {m: [internal[m]] for m in MODALITIES}
    if use_external:
        report["external_rows"] = external_entries.num_rows
        if cfg.purify:
            keep, aligned, purification = purify_external(internal, external, cfg)
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
    manifest = {
        "format": FORMAT_VERSION,
        "encoder": encoder_info or {},
        "rows": entries.num_rows,
        "image_dim": full["image"].shape[1],
        "text_dim": full["text"].shape[1],
        "shards": [{"start": s.start, "stop": s.stop, "path": _shard_dir(i)} for i, s in enumerate(shards)],
        "config": cfg.model_dump(mode="json"),
        "calibration": calibration_summary(calibration),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    manifest["version"] = _version(manifest, full)
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
    kind = choose_kind(len(vectors["image"]), cfg.index)
    image, text = (index_shards(vectors[m], cfg.index, kind=kind) for m in MODALITIES)
    return [Shard(i.offset, i.offset + len(i), i, t) for i, t in zip(image, text)]


def _entries(table: pa.Table, source: str) -> pa.Table:
    cols = {
        "id": table.column("id").cast(pa.string()),
        "source": pa.array([source] * table.num_rows, pa.string()),
        "text": table.column("text").cast(pa.string()),
        "image": table.column("image").cast(pa.binary()) if "image" in table.column_names
        else pa.nulls(table.num_rows, pa.binary()),
    }
    return pa.table(cols)


def _version(manifest: dict, vectors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(json.dumps({k: v for k, v in manifest.items() if k != "created"}, sort_keys=True).encode())
    for m in MODALITIES:
        h.update(np.ascontiguousarray(vectors[m]).tobytes())
    return h.hexdigest()[:16]


def _shard_dir(i: int) -> str:
    return f"shard-{i:05d}"


# ------------------------------------------------------------------------------------------------
# Persistence (local folders; object storage through fsspec)
# ------------------------------------------------------------------------------------------------


def _url_to_fs(uri: str, storage_options: dict | None):
    """fsspec filesystem and path; the storage options apply to object storage only."""
    from pipeline.storage import url_to_fs

    return url_to_fs(uri, storage_options)


def save(kb: KnowledgeBase, uri: str, storage_options: dict | None = None) -> str:
    """Write the knowledge base to a local folder or an object-storage prefix; returns its version."""
    with tempfile.TemporaryDirectory(prefix="rag4dmc-kb-") as tmp:
        root = Path(tmp)
        write_entries(kb.entries, root / ENTRIES_FILE)
        kb.mapping.save(root / "mapping.pt")
        (root / "report.json").write_text(json.dumps(kb.report, indent=2, default=float))
        for i, s in enumerate(kb.shards):
            for m in MODALITIES:
                s.index(m).save(root / _shard_dir(i) / m)
        (root / "manifest.json").write_text(json.dumps(kb.manifest, indent=2))  # written last: marks completion
        fs, path = _url_to_fs(uri, storage_options)
        if fs.exists(f"{path}/manifest.json"):
            fs.rm(path, recursive=True)
        fs.makedirs(path, exist_ok=True)
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != "manifest.json")
        for p in files + [root / "manifest.json"]:
            dest = f"{path}/{p.relative_to(root).as_posix()}"
            fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(p), dest)
    return kb.version


def local_copy(uri: str, storage_options: dict | None = None, cache_dir: str | None = None,
               parts: list[str] | None = None) -> Path:
    """A local folder holding the knowledge base at ``uri``.

    Remote URIs are downloaded into a per-version cache, and only ``parts`` (paths of files or folders
    relative to the KB root; None: everything): a retrieval actor fetches its own shard group, not the
    whole index. Each part is downloaded once per node and moved into place atomically, so actors that
    start together on a node share the copy.
    """
    from fsspec.implementations.local import LocalFileSystem

    fs, path = _url_to_fs(uri, storage_options)
    if not fs.exists(f"{path}/manifest.json"):
        raise FileNotFoundError(f"no knowledge base at {uri} (manifest.json missing): run `rag4dmc kb build` first")
    if isinstance(fs, LocalFileSystem):
        return Path(path)
    manifest = fs.cat_file(f"{path}/manifest.json")
    cache = Path(cache_dir or Path(tempfile.gettempdir()) / "rag4dmc-kb-cache") / json.loads(manifest)["version"]
    cache.mkdir(parents=True, exist_ok=True)
    if parts is None:
        parts = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    for part in dict.fromkeys([p for p in parts if p != "manifest.json"]):
        dest = cache / part
        if dest.exists():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
        if fs.isdir(f"{path}/{part}"):
            fs.get(f"{path}/{part}/", str(tmp), recursive=True)
        else:
            fs.get_file(f"{path}/{part}", str(tmp))
        try:
            tmp.rename(dest)
        except OSError:  # another process on this node moved its copy into place first
            shutil.rmtree(tmp, ignore_errors=True)
    if not (cache / "manifest.json").exists():
        tmp = cache / f".manifest.json.partial-{os.getpid()}"
        tmp.write_bytes(manifest)
        tmp.rename(cache / "manifest.json")
    return cache


def write_entries(entries: pa.Table, path: str | Path) -> None:
    """The entries as an uncompressed Arrow IPC file (memory-mappable; the image bytes are already compressed)."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, entries.schema) as writer:
        writer.write_table(entries, max_chunksize=ENTRIES_BATCH_ROWS)


def open_entries(path: str | Path) -> pa.Table:
    """The entries file memory-mapped: no row is read until it is used, and actors on one node share pages."""
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


def load_entries(uri: str, storage_options: dict | None = None) -> pa.Table:
    """The knowledge base's entries (id, source, text, image), memory-mapped from its local copy."""
    root = local_copy(uri, storage_options, parts=[ENTRIES_FILE])
    _check_format(json.loads((root / "manifest.json").read_text()), uri)
    return open_entries(root / ENTRIES_FILE)


def take_entries(entries: pa.Table, ids: np.ndarray) -> dict[str, list]:
    """Columns id, text and image of the given KB rows, in order (one gather for a whole batch)."""
    rows = entries.take(pa.array(np.asarray(ids, dtype=np.int64)))
    return {c: rows.column(c).to_pylist() for c in ("id", "text", "image")}


def _check_format(manifest: dict, uri: str) -> None:
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"knowledge base at {uri} has format {manifest.get('format')}, this version of rag4dmc "
                         f"reads format {FORMAT_VERSION}: rebuild it with `rag4dmc kb build`")


def load(uri: str, storage_options: dict | None = None, shards: list[int] | None = None,
         with_entries: bool = True, searched: str | None = None) -> KnowledgeBase:
    """Load a knowledge base (optionally only some shards, e.g. the one a retrieval actor holds).

    ``searched``: load only this modality's FAISS index (the other modality's vectors are still mapped for
    the fusion cross term); a retrieval actor searches one index. Entries are memory-mapped.
    """
    if searched not in (None, *MODALITIES):
        raise ValueError(f"searched must be one of {MODALITIES} or None, got {searched!r}")
    root = local_copy(uri, storage_options, parts=["manifest.json"])
    manifest = json.loads((root / "manifest.json").read_text())
    _check_format(manifest, uri)
    wanted = range(len(manifest["shards"])) if shards is None else shards
    parts = ["mapping.pt", "report.json", *([ENTRIES_FILE] if with_entries else [])]
    for i in wanted:
        for m in MODALITIES:
            parts += [f"{manifest['shards'][i]['path']}/{m}/{f}" for f in VectorIndex.files(with_index=searched in (None, m))]
    root = local_copy(uri, storage_options, parts=parts)
    loaded = []
    for i in wanted:
        s = manifest["shards"][i]
        loaded.append(Shard(s["start"], s["stop"], *(
            VectorIndex.load(root / s["path"] / m, with_index=searched in (None, m)) for m in MODALITIES)))
    entries = open_entries(root / ENTRIES_FILE) if with_entries else pa.table({})
    report = json.loads((root / "report.json").read_text())
    return KnowledgeBase(entries, CrossModalMapper.load(root / "mapping.pt"), loaded, report, manifest)
