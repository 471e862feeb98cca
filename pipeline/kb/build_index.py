"""Step 3 of the out-of-core build, index (one Ray task per index shard): each modality's index trained once on a
random sample, populated from the purified parts with its rows' float16 vectors, and its recall@10 against exact
search measured over a grid of (nprobe, rerank depth); the cheapest pair that reaches ``index.min_recall`` is kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil

import numpy as np

from rag4dmc.pipeline.config import KBConfig, Stream
from rag4dmc.pipeline.core.cluster_filter import (
    sample_ids,
)
from rag4dmc.pipeline.core.index import RECALL_K
from rag4dmc.pipeline.core.retrieval import MODALITIES
from rag4dmc.pipeline.io import embedding_layout as layout
from rag4dmc.pipeline.io.storage import url_to_fs
from rag4dmc.pipeline.kb.build_memory import PeakAnon, peak_rss
from rag4dmc.pipeline.kb.build_sides import Side

log = logging.getLogger(__name__)

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
    out["peak_rss"] = peak_rss()
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
            folder = Path(tmp) / m if remote else Path(url_to_fs(dest, opts)[1])
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
    result["peak_rss"], result["peak_anon"] = peak_rss(), anon.peak
    return result


def _upload(folder, dest: str, storage_options: dict | None) -> None:
    """Copy a local folder's files to ``dest`` (a local folder or an object-storage prefix)."""
    fs, path = url_to_fs(dest, storage_options)
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
            fs, p = url_to_fs(f"{out}/{path}/{m}/{META_FILE}", storage_options)
            meta = json.loads(fs.cat_file(p))
            meta.update(rerank_factor=recall["rerank_factor"][m], nprobe=recall["nprobe"][m])
            if meta.get("quantizer_ef"):
                meta["quantizer_ef"] = quantizer_ef_for(meta["nprobe"], cfg.index)
            fs.pipe_file(p, json.dumps(meta).encode())
