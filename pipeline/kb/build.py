"""The knowledge-base build out of core: from embeddings in the clip-retrieval layout to a saved KB.

Every step reads bounded pieces, so the driver's memory does not grow with the corpus (the plan follows
autofaiss, NeMo Curator's semantic k-means and FAISS's recipe for indexes that do not fit in RAM):

1. **fit** (one Ray task): on bounded random samples, train the mapping MLP on internal pairs, fit the
   filter's k-means on both sides (:func:`rag4dmc.pipeline.core.cluster_filter.fit_filter`), and the CSLS/Procrustes rotation W
   on a sample of the external rows the filter keeps; the calibration runs on the same samples.
2. **purify** (a streaming Ray Data pass, one task per layout shard): assign every external row to its
   cluster, drop what the filter drops, rotate the rest by W; internal rows pass through. Each task writes
   one purified part (float16 vectors, entries by reference) in the same layout, and skips a part already
   written (resume).
3. **index** (one Ray task per index shard, over a range of global row ids): each modality's index is
   trained once on a random sample, then populated from the parts, written with its rows' float16 vectors
   (memory-mapped by the readers, for the exact rerank and the fusion cross term), and its recall@10
   against exact search measured on sampled queries.
4. **entries**: the parts' metadata streamed into one memory-mapped Arrow file (id, source, text and where
   the image is: ``image_uri``, or ``image_shard`` + ``image_row``; never the image bytes).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import pickle
import resource
import shutil
import threading
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from rag4dmc.actors.resources import use_assigned_cpus
from rag4dmc.pipeline.config import KBConfig, Stream
from rag4dmc.pipeline.core.alignment import align_candidate_ids, align_with_report, first_kept
from rag4dmc.pipeline.core.cluster_filter import (
    EXTERNAL_CLUSTER_CAP,
    default_clusters,
    external_sample_ids,
    fit_filter,
    kmeans_sample_size,
    sample_ids,
)
from rag4dmc.pipeline.core.index import RERANK_GATHER_BYTES
from rag4dmc.pipeline.core.knn import normalize_rows
from rag4dmc.pipeline.core.retrieval import MODALITIES
from rag4dmc.pipeline.io import embedding_layout as layout
from rag4dmc.pipeline.kb.store import PARTS_DIR

log = logging.getLogger(__name__)

INTERNAL, EXTERNAL = "internal", "external"
LOCATION_SCHEMA = pa.schema([("image_shard", pa.string()), ("image_row", pa.int64())])
PART_SCHEMA = pa.schema([("source", pa.string()), *LOCATION_SCHEMA])
RECALL_K = 10
BASE_PROCESS_BYTES = 700 * 2**20  # a Python process with torch, faiss and Ray imported (668 MiB RSS measured)
METADATA_BYTES_PER_ROW = 256  # an entry's id, caption and image location in Arrow (LAION captions: ~60 bytes)
MEMORY_SAMPLE_S = 0.25  # how often a task's anonymous memory is sampled for its peak


@dataclass(frozen=True)
class Side:
    """One side of the KB's input: its layout shards and their global row offsets."""

    name: str
    root: str
    shards: list[layout.EmbeddingShard]

    @property
    def rows(self) -> int:
        return layout.total_rows(self.shards)

    @property
    def offsets(self) -> np.ndarray:
        return layout.shard_offsets(self.shards)

    def read(self, ids: np.ndarray, modality: str, storage_options: dict | None) -> np.ndarray:
        """Unit-norm float32 vectors of these side-global row ids."""
        return normalize_rows(layout.read_rows(self.shards, self.offsets, ids, modality, storage_options),
                              f"{self.name} {modality} embeddings")


def open_side(name: str, root: str, storage_options: dict | None, dims: tuple[int, int] | None = None) -> Side:
    """The layout at ``root``, checked against the encoder's (image, text) dims when they are known."""
    shards = layout.list_embedding_shards(root, storage_options)
    if dims is not None:
        try:
            layout.check_dims(shards, dims[0], dims[1], f"{name} embeddings at {root}")
        except layout.LayoutError as exc:
            raise layout.LayoutError(f"{exc} (the encoder is chosen with --encoder / --model-name, e.g. "
                                     "--encoder open_clip --model-name ViT-L-14 for LAION's 768-d embeddings)") from None
    return Side(name, root, shards)


def _peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux reports KiB): with the pages of memory-mapped files
    it has touched, which are page cache the kernel reclaims, not memory the process holds."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _anon_bytes() -> int:
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
    """The peak of :func:`_anon_bytes` while the block runs, sampled by a thread every ``interval`` seconds."""

    def __init__(self, interval: float = MEMORY_SAMPLE_S):
        self.interval, self.peak = interval, _anon_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="rag4dmc-peak-anon")

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _anon_bytes())

    def __enter__(self) -> PeakAnon:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _anon_bytes())


# ------------------------------------------------------------------------------------------------
# Memory you can state in advance
# ------------------------------------------------------------------------------------------------


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
        "piece_rows": cfg.build.piece_rows,
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
    purify = s["piece_rows"] * d_sum * f4 * 4 + max_shard_rows * d_sum * 2  # a piece's work, the part's float16
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


# ------------------------------------------------------------------------------------------------
# 1. fit: mapping, filter k-means, rotation W (and calibration), on bounded samples
# ------------------------------------------------------------------------------------------------


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


def fit(internal: Side, external: Side | None, cfg: KBConfig, storage_options: dict | None) -> Fitted:
    """Step 1, run as one task: everything the streaming passes need, fitted on bounded random samples."""
    from rag4dmc.pipeline.core.mapping import train_mapping
    from rag4dmc.pipeline.kb.calibrate import calibrate

    t0 = time.perf_counter()
    int_ids = sample_ids(internal.rows, cfg.mapping.max_rows, cfg.mapping.seed)
    inner = {m: internal.read(int_ids, m, storage_options) for m in MODALITIES}
    report: dict = {"internal_rows": internal.rows, "internal_sample_rows": len(int_ids)}
    use_external = external is not None and external.rows > 0 and cfg.use_external
    calibration = None
    if cfg.calibration.enabled:
        ext_cal = None
        if use_external:
            cal_ids = sample_ids(external.rows, cfg.calibration.max_rows, cfg.calibration.seed)
            ext_cal = {m: external.read(cal_ids, m, storage_options) for m in MODALITIES}
        calibration = calibrate(_texts(internal, int_ids, storage_options), None, inner,
                                _texts(external, cal_ids, storage_options) if use_external else None, None,
                                ext_cal, cfg)
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
    return Fitted(mapping, filters, rotations, cfg, report, calibration, _peak_rss())


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


def _texts(side: Side, ids: np.ndarray, storage_options: dict | None) -> list[str]:
    """Texts of side-global row ids in their order (for the calibration's BLEU), from the metadata row groups that
    hold them."""
    ids = np.asarray(ids, np.int64)
    texts = np.empty(len(ids), object)
    offsets = side.offsets
    for i, shard in enumerate(side.shards):
        where = np.flatnonzero((ids >= offsets[i]) & (ids < offsets[i + 1]))
        if len(where):
            meta = layout.read_metadata(shard, storage_options, rows=ids[where] - offsets[i])
            texts[where] = [t or "" for t in meta.column("text").to_pylist()]
    return texts.tolist()


# ------------------------------------------------------------------------------------------------
# 2. purify: the streaming pass over every row, one task per layout shard
# ------------------------------------------------------------------------------------------------


def purify_shard(item: dict) -> dict:
    """One layout shard -> one purified part (kept rows, rotated, float16; entries by reference); resumable."""
    side, shard, out, opts = item["side"], item["shard"], item["out"], item["storage_options"]
    fitted: Fitted = item["fitted"]
    part_root = f"{out}/{PARTS_DIR}/{side}"
    counts_uri = f"{part_root}/counts/counts_{shard.number}.json"
    fs, counts_path = layout.url_to_fs(counts_uri, opts)
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
              "filter": totals, "peak_rss": _peak_rss()}
    fs.makedirs(counts_path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(counts_path, json.dumps(result).encode())  # before the metadata, which marks the part complete
    layout.write_embedding_shard(part_root, shard.number, stacked["image"], stacked["text"], part_meta, opts)
    return result


# ------------------------------------------------------------------------------------------------
# 3. index: trained once on a random sample, populated per shard over a range of global row ids
# ------------------------------------------------------------------------------------------------


def train_indexes(parts: Side, kind: str, cfg: KBConfig, storage_options: dict | None) -> dict:
    """Per modality, an empty index trained on a random sample of every KB row, serialised (small)."""
    import faiss

    from rag4dmc.pipeline.core.index import train_empty, train_rows

    n = parts.rows
    ids = sample_ids(n, train_rows(n, kind, cfg.index), (cfg.filter.seed, Stream.INDEX_TRAIN_SAMPLE))
    out = {"peak_rss": 0, "train_rows": int(len(ids))}
    for m in MODALITIES:
        dim = getattr(parts.shards[0], f"{m}_dim")
        sample = parts.read(ids, m, storage_options) if len(ids) else np.zeros((0, dim), np.float32)
        out[m] = faiss.serialize_index(train_empty(sample, n, kind, cfg.index))
    out["peak_rss"] = _peak_rss()
    return out


def _ranges(parts: Side, start: int, stop: int, piece: int):
    """(shard, local start, local stop) pieces of global rows [start, stop) over the parts, in order."""
    offsets = parts.offsets
    for i, shard in enumerate(parts.shards):
        a, b = max(start, offsets[i]), min(stop, offsets[i + 1])
        for s in range(a, b, piece):
            yield shard, int(s - offsets[i]), int(min(b, s + piece) - offsets[i])


def topk_merge(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise top-k of concatenated candidate lists (scores descending)."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def build_index_shard(task: dict, parts: Side, trained: dict, queries: dict) -> dict:
    """One index shard: rows [start, stop) of the KB added to copies of the ``trained`` (serialised) indexes,
    with their float16 vectors, saved to ``KB/shard-i/<modality>``; and the exact top-k of the recall ``queries``
    and their approximate top-k at each (nprobe, rerank depth) of the search grid. ``parts``, ``trained`` and
    ``queries`` are shared by every shard's task (put once)."""
    import tempfile
    from pathlib import Path

    import faiss

    from rag4dmc.pipeline.core.index import VECTORS_FILE, VectorIndex, search_grid, set_search_params
    from rag4dmc.pipeline.io.storage import is_remote

    start, stop, cfg, opts = task["start"], task["stop"], task["cfg"], task["storage_options"]
    k = RECALL_K + 1  # the query itself is among the KB rows: leave-one-out
    result = {"shard": task["shard"], "start": start, "stop": stop}
    remote = is_remote(task["out"])
    with tempfile.TemporaryDirectory(prefix="rag4dmc-index-") as tmp, PeakAnon() as anon:
        for m in MODALITIES:
            dim = getattr(parts.shards[0], f"{m}_dim")
            index = faiss.deserialize_index(trained[m])
            set_search_params(index, task["kind"], cfg.index)
            dest = f"{task['out']}/{task['path']}/{m}"
            # a local KB is written in place (its vectors are the largest files: no second copy on disk);
            # object storage gets a local folder, one modality at a time, uploaded when complete
            folder = Path(tmp) / m if remote else Path(layout.url_to_fs(dest, opts)[1])
            if folder.exists():
                shutil.rmtree(folder)  # an interrupted build's files of this shard
            folder.mkdir(parents=True)
            q = queries[m]
            exact_s = np.full((len(q), 0), -np.inf, np.float32)
            exact_i = np.zeros((len(q), 0), np.int64)
            at, digest = 0, hashlib.sha256()
            # the float16 vectors are written as a stream, not through a writable memory map, whose dirty pages
            # would count in this task's resident memory for the whole shard
            with open(folder / VECTORS_FILE, "wb") as f:
                np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
                                                          "fortran_order": False, "shape": (stop - start, dim)})
                for shard, a, b in _ranges(parts, start, stop, cfg.build.piece_rows):
                    x16 = np.ascontiguousarray(layout.read_vectors(getattr(shard, m), a, b, opts), np.float16)
                    f.write(x16.data)
                    digest.update(x16.data)
                    x = x16.astype(np.float32)  # what the KB keeps: float16
                    index.add(x)
                    sims = q @ x.T
                    kk = min(k, sims.shape[1])
                    top = np.argpartition(sims, sims.shape[1] - kk, axis=1)[:, -kk:]
                    exact_s, exact_i = topk_merge(np.hstack([exact_s, np.take_along_axis(sims, top, 1)]),
                                                  np.hstack([exact_i, top + start + at]), k)
                    at += len(x)
                    del x16, x, sims
            if at != stop - start:
                raise RuntimeError(f"index shard {task['shard']}: read {at} rows of the KB's [{start}, {stop}): the "
                                   "build's parts changed while it ran; rerun kb build")
            vectors = np.load(folder / VECTORS_FILE, mmap_mode="r")
            vi = VectorIndex(vectors, index, task["kind"], cfg.index.rerank_factor, offset=start)
            approx = {}
            grid = search_grid(task["kind"], cfg.index, faiss.extract_index_ivf(index).nlist if vi.nprobe else 1)
            for nprobe, factor in grid:  # ``recall_report`` keeps the cheapest pair that is enough
                if nprobe:
                    vi.set_nprobe(nprobe, cfg.index)
                vi.rerank_factor = factor
                approx[(nprobe, factor)] = vi.search(q, k)
            if grid[0][0]:  # saved at the cheapest pair; ``save_search_params`` writes the chosen one
                vi.set_nprobe(grid[0][0], cfg.index)
            vi.rerank_factor = grid[0][1]
            vi.save_index(folder)
            if remote:
                _upload(folder, dest, opts)
                shutil.rmtree(folder)
            result[m] = {"exact": (exact_s, exact_i), "approx": approx, "sha256": digest.hexdigest()}
            del vi, vectors, index
    result["peak_rss"], result["peak_anon"] = _peak_rss(), anon.peak
    return result


def _upload(folder, dest: str, storage_options: dict | None) -> None:
    """Copy a local folder's files to ``dest`` (a local folder or an object-storage prefix)."""
    fs, path = layout.url_to_fs(dest, storage_options)
    fs.makedirs(path, exist_ok=True)
    for f in sorted(folder.iterdir()):
        fs.put_file(str(f), f"{path}/{f.name}")


def _merged_top(parts: list[tuple[np.ndarray, np.ndarray]], query_ids: np.ndarray) -> np.ndarray:
    """The global top-k ids of per-shard (scores, ids), the query itself left out."""
    s = np.hstack([p[0] for p in parts])
    i = np.hstack([p[1] for p in parts])
    s = np.where(i == query_ids[:, None], -np.inf, s)
    return topk_merge(s, i, RECALL_K)[1]


def recall_report(results: list[dict], query_ids: np.ndarray, min_recall: float) -> dict:
    """recall@10 per modality of the approximate search against exact search, the query itself left out, at each
    (nprobe, rerank depth) measured; each modality keeps the pair ``index.pick_search`` chooses."""
    from rag4dmc.pipeline.core.index import pick_search, recall_at_k

    out: dict = {"queries": int(len(query_ids)), "k": RECALL_K, "min_recall": min_recall, "nprobe": {},
                 "rerank_factor": {}, "by_search": {}}
    for m in MODALITIES:
        exact = _merged_top([r[m]["exact"] for r in results], query_ids)
        grid = {pf: round(recall_at_k(_merged_top([r[m]["approx"][pf] for r in results], query_ids), exact,
                                      RECALL_K), 4) for pf in results[0][m]["approx"]}
        nprobe, factor = pick_search(grid, min_recall)
        out[m], out["nprobe"][m], out["rerank_factor"][m] = grid[(nprobe, factor)], nprobe, factor
        out["by_search"][m] = [{"nprobe": p, "rerank_factor": f, "recall": r} for (p, f), r in grid.items()]
    out["below_min"] = any(out[m] < min_recall for m in MODALITIES)
    return out


def warn_if_below_min(recall: dict) -> bool:
    """Warn, naming the knobs to turn, when ``recall_report``'s chosen recall is below ``index.min_recall``."""
    if not recall["below_min"]:
        return False
    tried = [(e["nprobe"], e["rerank_factor"]) for e in recall["by_search"]["image"]]
    log.warning("index recall@%d %s is below index.min_recall %.2f even at nprobe %d and rerank_factor %d (0: "
                "not an IVF index): raise index.max_nprobe (up to the lists there are), "
                "index.max_rerank_factor or index.bytes_per_row and rebuild", recall["k"],
                {m: recall[m] for m in MODALITIES}, recall["min_recall"], max(p for p, _ in tried),
                max(f for _, f in tried))
    return True


def save_search_params(out: str, shard_paths: list[str], recall: dict, cfg: KBConfig,
                       storage_options: dict | None) -> None:
    """Each index's saved metadata with the (nprobe, rerank depth) the build chose for its modality."""
    from rag4dmc.pipeline.core.index import META_FILE, quantizer_ef_for

    for path in shard_paths:
        for m in MODALITIES:
            fs, p = layout.url_to_fs(f"{out}/{path}/{m}/{META_FILE}", storage_options)
            meta = json.loads(fs.cat_file(p))
            meta.update(rerank_factor=recall["rerank_factor"][m], nprobe=recall["nprobe"][m])
            if meta.get("quantizer_ef"):
                meta["quantizer_ef"] = quantizer_ef_for(meta["nprobe"], cfg.index)
            fs.pipe_file(p, json.dumps(meta).encode())


# ------------------------------------------------------------------------------------------------
# 4. entries, and the whole build
# ------------------------------------------------------------------------------------------------


def write_entries(parts: Side, uri: str, storage_options: dict | None) -> tuple[int, str]:
    """The parts' metadata, in KB row order, as the memory-mapped entries file; one part in memory at a time.
    Returns the rows and the file's sha256."""
    import tempfile
    from pathlib import Path

    from rag4dmc.pipeline.kb.store import ENTRIES_BATCH_ROWS, ENTRY_SCHEMA

    with tempfile.TemporaryDirectory(prefix="rag4dmc-entries-") as tmp:
        path = Path(tmp) / "entries.arrow"
        rows = 0
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, ENTRY_SCHEMA) as writer:
            for shard in parts.shards:
                meta = layout.read_metadata(shard, storage_options, extra=PART_SCHEMA)
                table = pa.table({c: meta[c] for c in ENTRY_SCHEMA.names}).cast(ENTRY_SCHEMA)
                writer.write_table(table, max_chunksize=ENTRIES_BATCH_ROWS)
                rows += table.num_rows
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
        fs, dest = layout.url_to_fs(uri, storage_options)
        fs.put_file(str(path), dest)
    return rows, digest.hexdigest()


def fingerprint(internal: Side, external: Side | None, cfg: KBConfig) -> str:
    """What the purified parts depend on: the inputs' shards and the config (not how the build runs)."""
    sides = [(s.name, s.root, [(sh.number, sh.rows) for sh in s.shards]) for s in (internal, external) if s]
    payload = {"sides": sides, "cfg": cfg.model_dump(mode="json", exclude={"build"})}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def resumed_fit(out: str, key: str, storage_options: dict | None) -> Fitted | None:
    """The fit of an interrupted build of the same inputs and config; otherwise its leftover parts are cleared."""
    fs, path = layout.url_to_fs(f"{out}/{PARTS_DIR}", storage_options)
    try:
        if json.loads(fs.cat_file(f"{path}/fit.json"))["fingerprint"] == key:
            return pickle.loads(fs.cat_file(f"{path}/fitted.pkl"))
    except (FileNotFoundError, KeyError, ValueError, pickle.UnpicklingError):
        pass
    if fs.exists(path):
        log.info("removing the parts of an interrupted build of other inputs or settings at %s", path)
        fs.rm(path, recursive=True)
    return None


def save_fit(out: str, key: str, fitted: Fitted, storage_options: dict | None) -> None:
    """Keep the fit beside the parts, so a resumed build purifies its remaining shards with the same W."""
    fs, path = layout.url_to_fs(f"{out}/{PARTS_DIR}", storage_options)
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(f"{path}/fitted.pkl", pickle.dumps(fitted))
    fs.pipe_file(f"{path}/fit.json", json.dumps({"fingerprint": key}).encode())  # last: marks the fit saved


@dataclass
class BuildInputs:
    """Where the build's embeddings are, and what they must match."""

    internal: str  # a layout folder
    external: str | None
    out: str
    dims: tuple[int, int]  # (image, text) of the KB's encoder
    encoder_info: dict
    storage_options: dict | None = None
    columns: dict | None = None  # the input columns (where image_shard rows keep their image), for the manifest
    report: dict | None = None  # more for report.json (e.g. the embedding stage's counts)


def _stage(report: dict, name: str, t0: float, peaks: list[int], anon: list[int] = ()) -> None:
    """A stage's wall time and its largest task's peak RSS (and peak anonymous memory, where sampled: RSS also
    counts the page cache of memory-mapped files the task read)."""
    stage = {"seconds": round(time.perf_counter() - t0, 3), "task_peak_rss_bytes": int(max(peaks, default=0))}
    if anon:
        stage["task_peak_anon_bytes"] = int(max(anon))
    report.setdefault("stages", {})[name] = stage


def build(inputs: BuildInputs, cfg: KBConfig = KBConfig()) -> dict:
    """Fit, purify, index and save the knowledge base at ``inputs.out``; returns its manifest and report."""
    import ray

    from rag4dmc.pipeline.core.index import choose_kind
    from rag4dmc.pipeline.kb import store as kb_store

    opts = inputs.storage_options
    t_all = time.perf_counter()
    internal = open_side(INTERNAL, inputs.internal, opts, inputs.dims)
    if internal.rows < 4:
        raise ValueError(f"{inputs.internal} has {internal.rows} complete image-text pairs; the mapping needs at "
                         "least 4 (the internal part of the KB is the complete pairs)")
    external = open_side(EXTERNAL, inputs.external, opts, inputs.dims) if inputs.external else None
    n_ext = external.rows if external is not None and cfg.use_external else 0
    largest = max(sh.rows for side in (internal, external) if side is not None for sh in side.shards)
    estimate = estimate_memory(internal.rows, n_ext, inputs.dims, cfg, largest)
    node = _largest_node_bytes()
    check_memory(estimate, node, _host_bytes())
    node_cpus, cluster_cpus = _cpus()
    single = cfg.build.single_task_cpus or node_cpus
    if max(single, cfg.build.task_cpus) > node_cpus:
        raise ValueError(f"build.single_task_cpus {single} / build.task_cpus {cfg.build.task_cpus}: the largest Ray "
                         f"node has {node_cpus:g} CPUs, so such a task would never be scheduled; lower them")
    log.info("kb build: %d internal and %d external rows; estimated peaks %s", internal.rows, n_ext,
             {k: f"{v / 2**30:.2f} GiB" for k, v in estimate.items() if k != "sizes"})
    _unmark(inputs.out, opts)  # a KB folder being rebuilt is not a KB until its new manifest is written

    def task(fn, step: str, cpus: float):
        return ray.remote(num_cpus=cpus, memory=min(estimate[step], node), max_calls=1)(_with_assigned_cpus(fn))

    # 1. fit (or the fit of an interrupted build of the same inputs and config)
    t0 = time.perf_counter()
    key = fingerprint(internal, external if n_ext else None, cfg)
    fitted = resumed_fit(inputs.out, key, opts)
    resumed = fitted is not None
    sizes = estimate["sizes"]
    if fitted is None:
        log.info("fit (one task, %g CPUs; minutes): the mapping on %d internal pairs, k-means on %d internal + %d "
                 "external rows, W on up to %d rows per side", single, sizes["internal_sample"],
                 sizes["kmeans_internal"], sizes["kmeans_external"], sizes["align_rows"])
        fitted = ray.get(task(fit, "fit", single).remote(internal, external if n_ext else None, cfg, opts))
        save_fit(inputs.out, key, fitted, opts)
        log.info("fit done in %.0f s", time.perf_counter() - t0)
    else:
        log.info("fit: reusing the fit of an interrupted build of the same inputs and settings")
    cfg = fitted.cfg
    report = {**(inputs.report or {}), **fitted.report, "fit_resumed": resumed,
              "memory_estimate_bytes": {k: int(v) for k, v in estimate.items() if k != "sizes"},
              "sizes": estimate["sizes"]}
    _stage(report, "fit", t0, [fitted.peak_rss])
    # 2. purify (streaming: one Ray Data task per layout shard; a written part is skipped)
    t0 = time.perf_counter()
    fitted_ref = ray.put(fitted)
    sides = (internal, *([external] if n_ext else []))
    items = [{"side": s.name, "shard": sh, "out": inputs.out, "storage_options": opts, "fitted": fitted_ref}
             for s in sides for sh in s.shards]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    counts = list(ds.map(_purify_row, num_cpus=spread_cpus(len(items), cfg.build.task_cpus, node_cpus, cluster_cpus),
                         memory=min(estimate["purify"], node),
                         max_calls=1).iter_rows())
    _stage(report, "purify", t0, [c["peak_rss"] for c in counts])
    report["resumed_parts"] = sum(bool(c.get("resumed")) for c in counts)
    if n_ext:
        report["external_rows"] = n_ext
        if fitted.filters is not None:
            report.update(_purification_report(fitted, [c for c in counts if c["side"] == EXTERNAL]))
        else:
            report["purification"] = "disabled"
    parts = Side("kb", inputs.out, _parts(inputs.out, opts, sides))
    n = parts.rows
    log.info("purify done in %.0f s: %d rows in the KB", report["stages"]["purify"]["seconds"], n)
    # 3. index: trained once, then one task per shard over a range of global row ids
    t0 = time.perf_counter()
    kind = choose_kind(n, cfg.index, max(inputs.dims))
    n_shards = max(1, min(estimate["sizes"]["shards"], n))
    log.info("index (%s): trained on a random sample in one task, then populated by %d shard task(s)", kind,
             n_shards)
    parts_ref = ray.put(parts)
    trained = ray.get(task(train_indexes, "train", single).remote(parts_ref, kind, cfg, opts))
    query_ids = sample_ids(n, cfg.index.recall_queries, (cfg.filter.seed, Stream.RECALL_QUERIES))
    queries = ray.put({m: parts.read(query_ids, m, opts) for m in MODALITIES})
    trained_ref = ray.put({m: trained[m] for m in MODALITIES})
    bounds = np.linspace(0, n, n_shards + 1).astype(int)
    shard_fn = task(build_index_shard, "index", spread_cpus(n_shards, cfg.build.task_cpus, node_cpus, cluster_cpus))
    results = ray.get([shard_fn.remote({"start": int(a), "stop": int(b), "shard": i, "kind": kind,
                                         "path": kb_store.shard_dir(i), "cfg": cfg, "out": inputs.out,
                                         "storage_options": opts}, parts_ref, trained_ref, queries)
                       for i, (a, b) in enumerate(zip(bounds, bounds[1:]))])
    _stage(report, "index", t0, [trained["peak_rss"], *(r["peak_rss"] for r in results)],
           [r["peak_anon"] for r in results])
    report["index_kind"] = kind
    report["index_train_rows"] = trained["train_rows"]
    report["recall"] = recall_report(results, query_ids, cfg.index.min_recall)
    save_search_params(inputs.out, [kb_store.shard_dir(i) for i in range(n_shards)], report["recall"], cfg, opts)
    log.info("index done in %.0f s: recall@%d %s at nprobe %s, rerank_factor %s", report["stages"]["index"]["seconds"],
             RECALL_K, {m: report["recall"][m] for m in MODALITIES}, report["recall"]["nprobe"],
             report["recall"]["rerank_factor"])
    warn_if_below_min(report["recall"])
    # 4. entries, mapping, report, manifest (last: it marks the KB complete)
    t0 = time.perf_counter()
    rows, entries_sha = write_entries(parts, f"{inputs.out}/{kb_store.ENTRIES_FILE}", opts)
    _stage(report, "entries", t0, [])
    report["kb_rows"] = rows
    report["calibration"] = fitted.calibration if fitted.calibration is not None else (
        "disabled" if not cfg.calibration.enabled else "skipped: too few internal pairs to hold any out")
    report["build_seconds"] = round(time.perf_counter() - t_all, 3)
    report["driver_peak_rss_bytes"] = _peak_rss()
    manifest = kb_store.new_manifest(
        encoder=inputs.encoder_info, rows=rows, dims=inputs.dims, cfg=cfg, calibration=fitted.calibration,
        shards=[{"start": int(a), "stop": int(b), "path": kb_store.shard_dir(i)}
                for i, (a, b) in enumerate(zip(bounds, bounds[1:]))],
        content=[entries_sha.encode(), *(r[m]["sha256"].encode() for r in results for m in MODALITIES)],
        input_columns=inputs.columns)
    kb_store.write_small(inputs.out, fitted.mapping, report, manifest, opts)
    kb_store.remove_parts(inputs.out, opts)
    log.info("knowledge base %s: %d rows in %d shards (%s), recall@10 %s", manifest["version"], rows, n_shards,
             kind, {m: report["recall"][m] for m in MODALITIES})
    return {"version": manifest["version"], "rows": rows, "report": report, "out": inputs.out}


def _purify_row(item: dict) -> dict:
    """Ray Data map function of the purify pass: the fitted object travels by reference."""
    import ray

    use_assigned_cpus()
    item = dict(item)
    item["fitted"] = ray.get(item["fitted"])
    result = purify_shard(item)
    result["filter"] = json.dumps(result["filter"])  # a nested dict of counts, as one column
    return result


def _parts(out: str, storage_options: dict | None, sides: tuple[Side, ...]) -> list[layout.EmbeddingShard]:
    """The purified parts of these inputs in KB row order: internal ones, then external ones, by shard number."""
    found = []
    for side in sides:
        parts = {p.number: p for p in layout.list_embedding_shards(f"{out}/{PARTS_DIR}/{side.name}", storage_options)}
        missing = [sh.number for sh in side.shards if sh.number not in parts]
        if missing:
            raise RuntimeError(f"the purify pass left no part for {side.name} shards {missing[:5]}: rerun the build")
        found += [parts[sh.number] for sh in side.shards]
    return found


def _unmark(out: str, storage_options: dict | None) -> None:
    """Remove an earlier KB's manifest at ``out`` before its files are rewritten."""
    fs, path = layout.url_to_fs(f"{out}/manifest.json", storage_options)
    if fs.exists(path):
        log.info("rebuilding the knowledge base at %s", out)
        fs.rm(path)


def _purification_report(fitted: Fitted, counts: list[dict]) -> dict:
    """The filter's report per modality (the in-memory build's fields, from the fit and the streamed counts)."""
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


def spread_cpus(n_tasks: int, floor: float, node_cpus: float, cluster_cpus: float) -> float:
    """CPUs per task of a step of ``n_tasks`` parallel tasks: the cluster's CPUs shared out, at least ``floor``
    (``build.task_cpus``) and at most one node's (a single index shard gets the whole node, not one core)."""
    return max(floor, min(node_cpus, cluster_cpus // max(1, n_tasks)))


def _with_assigned_cpus(fn):
    """``fn`` run with as many BLAS/torch/FAISS threads as the Ray task reserved CPUs."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        use_assigned_cpus()
        return fn(*args, **kwargs)

    return run


def _cpus() -> tuple[float, float]:
    """CPUs of the largest alive Ray node, and of the whole cluster."""
    import ray

    alive = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    return float(max(alive, default=1) or 1), float(sum(alive) or 1)


def _largest_node_bytes() -> int:
    """Memory of the largest node in the Ray cluster (what one task can have at most)."""
    import ray

    return int(max((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)) or \
        _host_bytes()


def _host_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().total)
