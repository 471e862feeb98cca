"""Recall@10 and query speed of a built knowledge base's indexes at several rerank depths.

The build keeps the least depth that reaches ``index.min_recall`` (``pipeline.kb_build.recall_report``); this
measures the same curve on any KB, with the build's own code: leave-one-out queries drawn from the KB's rows,
exact top-10 by a blockwise scan of the memory-mapped float16 vectors, and the approximate search of every
shard merged, at each depth. Queries/s are one process's, on all the machine's cores.

    python bench/kb_rerank.py --kb /tmp/rag4dmc-kb-scale/kb-10000000
    python bench/kb_rerank.py --kb KB --factors 20,40,80,160 --queries 500
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import report  # noqa: E402
from pipeline import kb_build, kb_store  # noqa: E402
from pipeline.purify import sample_ids  # noqa: E402
from pipeline.retrieval import MODALITIES  # noqa: E402

SCAN_ROWS = 1_000_000  # rows of float16 vectors read at a time by the exact scan


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k (scores, global ids) of the queries over memory-mapped vectors, a piece at a time."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(vectors), SCAN_ROWS):
        piece = np.asarray(vectors[start:start + SCAN_ROWS], np.float32)
        sims = queries @ piece.T
        top = np.argpartition(-sims, min(k, sims.shape[1]) - 1, axis=1)[:, :k]
        best_s, best_i = kb_build.topk_merge(np.hstack([best_s, np.take_along_axis(sims, top, 1)]),
                                             np.hstack([best_i, top + offset + start]), k)
    return best_s, best_i


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kb", required=True)
    ap.add_argument("--factors", default="10,20,40,80,160", help="rerank depths (comma-separated)")
    ap.add_argument("--queries", type=int, default=500)
    args = ap.parse_args()
    factors = [int(f) for f in args.factors.split(",")]
    kb = kb_store.load(args.kb, with_entries=False)
    n = kb.shards[-1].stop
    query_ids = sample_ids(n, args.queries, 11)
    k = kb_build.RECALL_K + 1  # leave-one-out: the query is a KB row
    results, rows = [{} for _ in kb.shards], []
    saved = {m: kb.shards[0].index(m).rerank_factor for m in MODALITIES}  # what the build chose
    speed: dict[str, dict[int, float]] = {m: {} for m in MODALITIES}
    for m in MODALITIES:
        q = np.vstack([np.asarray(sh.vectors(m)[query_ids[(query_ids >= sh.start) & (query_ids < sh.stop)]
                                                - sh.start], np.float32) for sh in kb.shards])
        for r, sh in zip(results, kb.shards):
            r[m] = {"exact": exact_top(sh.vectors(m), q, k, sh.start), "approx": {}}
        for f in factors:
            t0 = time.perf_counter()
            for r, sh in zip(results, kb.shards):
                sh.index(m).rerank_factor = f
                r[m]["approx"][f] = sh.index(m).search(q, k)
            speed[m][f] = len(q) / (time.perf_counter() - t0)
    rec = kb_build.recall_report(results, query_ids, kb.manifest["config"]["index"]["min_recall"])
    for f in factors:
        rows.append({"rerank_factor": f, **{f"recall@10 {m}": rec["by_rerank_factor"][m][f] for m in MODALITIES},
                     **{f"queries/s {m}": round(speed[m][f], 1) for m in MODALITIES}})
    print(f"{n:,} rows in {len(kb.shards)} shards; kind {kb.shards[0].index('image').kind}; saved depth {saved}")
    report("kb_rerank", {f"rerank depth on {Path(args.kb).name} ({n:,} rows)": (rows, list(rows[0]))},
           {"benchmark": "kb_rerank", "kb": args.kb, "rows": n, "queries": len(query_ids), "saved": saved}, [])


if __name__ == "__main__":
    main()
