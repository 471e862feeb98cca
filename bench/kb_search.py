"""Recall@10 and query speed of a built knowledge base's indexes at each (nprobe, rerank depth).

The build measures this grid on its held-out queries and keeps the pair ``rag4dmc.pipeline.core.index.pick_search`` chooses
(``rag4dmc.pipeline.kb.build_index.recall_report``); this measures the same grid on any KB, with the build's own code:
leave-one-out queries drawn from the KB's rows, exact top-10 by a blockwise scan of the memory-mapped float16
vectors, and the approximate search of every shard merged, at each pair. nprobe only changes how an index is
searched, so a KB built before the build tuned it is measured here as a rebuild would search it. Queries/s are
one process's, on all the machine's cores (the first pair also pays for reading the vectors into the page cache).

    python bench/kb_search.py --kb /tmp/rag4dmc-kb-scale/kb-10000000
    python bench/kb_search.py --kb KB --nprobes 32,64,128,256 --factors 20,40,80 --queries 500
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rag4dmc.pipeline  # noqa: E402,F401  (before faiss: names the CPU to its OpenBLAS, pipeline/blas.py)

# isort: split
import faiss  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import report  # noqa: E402
from rag4dmc.pipeline.config import IndexConfig  # noqa: E402
from rag4dmc.pipeline.core import index as index_module  # noqa: E402
from rag4dmc.pipeline.core.cluster_filter import sample_ids  # noqa: E402
from rag4dmc.pipeline.core.index import pick_search  # noqa: E402
from rag4dmc.pipeline.core.retrieval import MODALITIES  # noqa: E402
from rag4dmc.pipeline.kb import build_index  # noqa: E402
from rag4dmc.pipeline.kb import store as kb_store

SCAN_ROWS = 200_000  # rows of float16 vectors read at a time by the exact scan (its top-k: ~16 B per query and row)


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k (scores, global ids) of the queries over memory-mapped vectors, a piece at a time."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(vectors), SCAN_ROWS):
        piece = np.asarray(vectors[start:start + SCAN_ROWS], np.float32)
        sims = queries @ piece.T
        kk = min(k, sims.shape[1])
        top = np.argpartition(sims, sims.shape[1] - kk, axis=1)[:, -kk:]
        best_s, best_i = build_index.topk_merge(np.hstack([best_s, np.take_along_axis(sims, top, 1)]),
                                             np.hstack([best_i, top + offset + start]), k)
    return best_s, best_i


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kb", required=True)
    ap.add_argument("--nprobes", type=ints, default=[32, 64, 128, 256], help="IVF lists probed (comma-separated)")
    ap.add_argument("--factors", type=ints, default=[20, 40, 80, 160], help="rerank depths (comma-separated)")
    ap.add_argument("--queries", type=int, default=500)
    args = ap.parse_args()
    kb = kb_store.load(args.kb, with_entries=False)
    cfg = IndexConfig(**kb.manifest["config"]["index"])
    n = kb.shards[-1].stop
    query_ids = sample_ids(n, args.queries, 11)
    k = index_module.RECALL_K + 1  # leave-one-out: the query is a KB row
    first = kb.shards[0].index("image")
    saved = {m: (kb.shards[0].index(m).nprobe, kb.shards[0].index(m).rerank_factor) for m in MODALITIES}
    nlist = min(faiss.extract_index_ivf(sh.index(m).index).nlist for sh in kb.shards for m in MODALITIES) \
        if first.nprobe else 0
    probes = list(dict.fromkeys(min(p, nlist) for p in args.nprobes)) if nlist else [0]  # at most every list
    grid = [(p, f) for p in probes for f in args.factors]
    results, speed = [{} for _ in kb.shards], {m: {} for m in MODALITIES}
    for m in MODALITIES:
        q = np.vstack([np.asarray(sh.vectors(m)[query_ids[(query_ids >= sh.start) & (query_ids < sh.stop)]
                                                - sh.start], np.float32) for sh in kb.shards])
        for r, sh in zip(results, kb.shards):
            r[m] = {"exact": exact_top(sh.vectors(m), q, k, sh.start), "approx": {}}
        for p, f in grid:
            t0 = time.perf_counter()
            for r, sh in zip(results, kb.shards):
                index = sh.index(m)
                if p:
                    index.set_nprobe(p, cfg)
                index.rerank_factor = f
                r[m]["approx"][(p, f)] = index.search(q, k)
            speed[m][(p, f)] = len(q) / (time.perf_counter() - t0)
    rec = build_index.recall_report(results, query_ids, cfg.min_recall)
    recall = {m: {(e["nprobe"], e["rerank_factor"]): e["recall"] for e in rec["by_search"][m]} for m in MODALITIES}
    rows = [{"nprobe": p, "rerank_factor": f, **{f"recall@10 {m}": recall[m][(p, f)] for m in MODALITIES},
             **{f"queries/s {m}": round(speed[m][(p, f)], 1) for m in MODALITIES}} for p, f in grid]
    chosen = {m: pick_search(recall[m], cfg.min_recall) for m in MODALITIES}
    print(f"{n:,} rows in {len(kb.shards)} shards; kind {first.kind}; saved (nprobe, rerank) {saved}; "
          f"the build's rule picks {chosen} at min_recall {cfg.min_recall}")
    report("kb_search", {f"search settings on {Path(args.kb).name} ({n:,} rows)": (rows, list(rows[0]))},
           {"benchmark": "kb_search", "kb": args.kb, "rows": n, "queries": len(query_ids),
            "saved": {m: list(v) for m, v in saved.items()}, "chosen": {m: list(v) for m, v in chosen.items()},
            "quantizer_ef_per_probe": cfg.quantizer_ef_per_probe}, [])


if __name__ == "__main__":
    main()
