"""Two-stage fusion retrieval over large knowledge bases: exact against the job's approximate index.

For each KB size (default 100,000 and 1,000,000 rows of paired 512-d "image" and "text" vectors from
``bench.common.LatentMixture``), queries go through the retrieval code the job's actors run
(``rag4dmc.pipeline.core.retrieval``: ``shard_candidates`` -> ``merge_candidates`` -> ``finish_retrieval``: stage-1 intra-modal
top_k, stage-2 fused rerank) in batches of the retrieval actor's batch size, against:

* ``flat``: exact search, the reference for recall;
* the index kind the job picks for that size (``rag4dmc.pipeline.core.index.choose_kind`` with the default
  ``IndexConfig``), and any other kinds asked for with ``--kinds``, with the default IndexConfig;
* ``--shards`` flat shards merged with the KB's merge, which must give the exact single-index answer
  (row by row equality of ids is asserted, up to ties in score), and the same shards of the job's kind.

Reported per index: build seconds, index bytes (the FAISS index as written to disk, plus the float32
vectors every kind keeps for the exact rerank), queries/s, recall@10 of the fused top-10 and of the
stage-1 top-k against exact. The pseudo-embeddings are given (the mapping MLP is not timed here).
Queries are fresh draws from the same mixture, their pseudo-embeddings noisier than the KB's text side.
For the exact index and the job's pick, the whole fusion retrieval is also timed against the bare FAISS index
answering stage 1's top-k for the same queries, at each ``--batch-sweep`` query batch (the wrapper's cost).

    python bench/retrieval.py                                  # 100k and 1M, 2,000 queries
    python bench/retrieval.py --sizes 20k --queries 500 --kinds auto,ivf,hnsw
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rag4dmc.pipeline  # noqa: E402,F401  (before faiss: names the CPU to its OpenBLAS, pipeline/blas.py)

# isort: split
import faiss  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import LatentMixture, Target, count, counts, measure, report  # noqa: E402
from rag4dmc.actors.retrieve import RetrieveNeighbours  # noqa: E402
from rag4dmc.pipeline.config import IndexConfig, RetrievalConfig  # noqa: E402
from rag4dmc.pipeline.core.index import VectorIndex, build_shards, choose_kind  # noqa: E402
from rag4dmc.pipeline.core.retrieval import Shard, finish_retrieval, merge_candidates, shard_candidates  # noqa: E402

RECALL_AT = 10
PSEUDO_NOISE = 0.15  # the mapped pseudo-embedding of a query is a noisier view than the KB's text vectors
QUERY_SEED, KB_SEED = 1, 0
TARGET_ROWS = 1_000_000
TARGET_QPS = 2_000
TARGET_RECALL = 0.95
TARGET_WRAPPER_RATIO = 0.8  # fusion retrieval's queries/s against raw FAISS's at the job's batch size
SCORE_TIE = 1e-5  # fused scores this close are a tie: either order is a correct answer
REFERENCE_BATCH = 4096  # queries per call for the (untimed) answers compared between indexes


def text_holder(vectors: np.ndarray, offset: int) -> VectorIndex:
    """The other modality of a shard: only its vectors are read (stage 2's cross term), never searched."""
    return VectorIndex(vectors, None, "flat", 1, offset)


def as_shards(indexes: list[VectorIndex], text: np.ndarray) -> list[Shard]:
    """KB shards pairing each image index with the text vectors of the same rows."""
    return [Shard(ix.offset, ix.offset + len(ix), ix, text_holder(text[ix.offset : ix.offset + len(ix)],
                                                                        ix.offset)) for ix in indexes]


def index_bytes(ix: VectorIndex) -> tuple[int, int]:
    """(FAISS index bytes as written to disk, rerank vector bytes) of one index."""
    with tempfile.TemporaryDirectory(prefix="rag4dmc-bench-index-") as tmp:
        path = os.path.join(tmp, "index.faiss")
        faiss.write_index(ix.index, path)
        return os.path.getsize(path), ix.vectors.nbytes


def run_queries(shards: list[Shard], queries: np.ndarray, pseudo: np.ndarray, cfg: RetrievalConfig,
                batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fused ids [n, n_results], fused scores, stage-1 ids [n, top_k]: the retrieval actors' code path."""
    ids, fused, stage1 = [], [], []
    for s in range(0, len(queries), batch):
        q, p = queries[s : s + batch], pseudo[s : s + batch]
        cand = merge_candidates([shard_candidates(sh, q, p, "image", cfg) for sh in shards], cfg.top_k)
        done = finish_retrieval(cand, cfg)
        ids.append(done.ids)
        fused.append(done.fused)
        stage1.append(cand.ids)
    return np.concatenate(ids), np.concatenate(fused), np.concatenate(stage1)


def queries_per_s(shards: list[Shard], queries: np.ndarray, pseudo: np.ndarray, cfg: RetrievalConfig,
                  batch: int, threads: int, repeats: int) -> tuple[float, float, float]:
    """(median, best, peak RSS GiB) queries/s over ``repeats`` timed passes with ``threads`` FAISS threads."""
    faiss.omp_set_num_threads(threads)
    run_queries(shards, queries[:batch], pseudo[:batch], cfg, batch)  # warm-up
    rates, peak = [], 0.0
    for _ in range(repeats):
        with measure() as m:
            run_queries(shards, queries, pseudo, cfg, batch)
        rates.append(len(queries) / m.seconds)
        peak = max(peak, m.peak_rss_gib)
    return statistics.median(rates), max(rates), peak


def raw_faiss_per_s(index: faiss.Index, queries: np.ndarray, k: int, batch: int, repeats: int) -> float:
    """Median queries/s of the bare FAISS index answering stage 1's top-k for unit queries: the physical reference."""
    q = np.ascontiguousarray(queries / np.linalg.norm(queries, axis=1, keepdims=True), dtype=np.float32)
    index.search(q[:batch], k)  # warm-up
    rates = []
    for _ in range(repeats):
        with measure() as m:
            for s in range(0, len(q), batch):
                index.search(q[s : s + batch], k)
        rates.append(len(q) / m.seconds)
    return statistics.median(rates)


def wrapper_cost(shards: list[Shard], queries: np.ndarray, pseudo: np.ndarray, cfg: RetrievalConfig, args,
                 n: int, name: str) -> list[dict]:
    """Fusion retrieval (search, gather, cross term, rerank) against raw FAISS on the same index and queries."""
    threads = max(args.threads)
    faiss.omp_set_num_threads(threads)
    index = shards[0].image
    tq = args.flat_timing_queries if index.kind == "flat" else len(queries)
    rows = []
    for batch in args.batch_sweep:
        raw = raw_faiss_per_s(index.index, queries[:tq], cfg.top_k, batch, args.repeats)
        fused = queries_per_s(shards, queries[:tq], pseudo[:tq], cfg, batch, threads, args.repeats)[0]
        rows.append({"rows": n, "index": name, "kind": index.kind, "nprobe": index.nprobe, "batch": batch,
                     "timed_queries": tq, "raw_faiss_qps": raw, "fusion_qps": fused, "fusion/raw": fused / raw})
        logging.info("%s", rows[-1])
    return rows


def recall(found: np.ndarray, truth: np.ndarray, at: int) -> float:
    return float(np.mean([len(set(a[:at]) & set(b[:at])) / at for a, b in zip(found, truth)]))


def same_answer(ids: np.ndarray, scores: np.ndarray, ref_ids: np.ndarray, ref_scores: np.ndarray) -> tuple[int, int]:
    """(rows with identical ids, rows whose differences are all score ties) against a reference answer."""
    identical = (ids == ref_ids).all(axis=1)
    tied = ~identical & np.isclose(scores, ref_scores, atol=SCORE_TIE).all(axis=1)
    return int(identical.sum()), int(tied.sum())


def bench_size(n: int, args, gen: LatentMixture, cfg: RetrievalConfig, sweep: bool) -> tuple[list[dict], ...]:
    """Rows of the main table, of the shard-equality table and of the nprobe sweep, at ``n`` KB rows."""
    icfg = IndexConfig()
    with measure() as m_gen:
        image, text = gen.sample(n, np.random.default_rng(KB_SEED))
        queries, pseudo = gen.sample(args.queries, np.random.default_rng(QUERY_SEED), other_noise=PSEUDO_NOISE)
    logging.info("generated %d x %d KB rows and %d queries in %.1f s", n, gen.dim, len(queries), m_gen.seconds)
    rows, shard_rows, sweep_rows, wrapper_rows, ref = [], [], [], [], {}

    def one(name: str, build) -> tuple[dict, list[Shard], tuple[np.ndarray, ...]]:
        with measure() as m_build:
            indexes = build()
        shards = as_shards(indexes, text)
        answer = run_queries(shards, queries, pseudo, cfg, REFERENCE_BATCH)
        exact = indexes[0].kind == "flat"  # exhaustive: timed on fewer queries
        tq = args.flat_timing_queries if exact else len(queries)
        sizes = [index_bytes(ix) for ix in indexes]
        row = {"rows": n, "index": name, "kind": indexes[0].kind, "shards": len(indexes), "build_s": m_build.seconds,
               "faiss_mib": sum(a for a, _ in sizes) / 2**20, "rerank_vectors_mib": sum(b for _, b in sizes) / 2**20,
               "timed_queries": tq, "peak_rss_gib": m_build.peak_rss_gib}
        for t in args.threads:
            med, best, peak = queries_per_s(shards, queries[:tq], pseudo[:tq], cfg, args.batch_size, t, args.repeats)
            row[f"qps_{t}t"], row[f"qps_{t}t_best"] = med, best
            row["peak_rss_gib"] = max(row["peak_rss_gib"], peak)
        if ref:
            row[f"recall@{RECALL_AT}"] = recall(answer[0], ref["ids"], RECALL_AT)
            row[f"stage1_recall@{cfg.top_k}"] = recall(answer[2], ref["stage1"], cfg.top_k)
        rows.append(row)
        logging.info("%s", row)
        return row, shards, answer

    _, shards, (ids, fused, stage1) = one("exact", lambda: [VectorIndex.build(image, icfg, kind="flat")])
    ref.update(ids=ids, fused=fused, stage1=stage1)
    if args.batch_sweep:
        wrapper_rows += wrapper_cost(shards, queries, pseudo, cfg, args, n, "exact")
    del shards
    gc.collect()

    auto = choose_kind(n, icfg)
    for kind in dict.fromkeys(auto if k == "auto" else k for k in args.kinds):
        if kind == "flat":
            continue
        name = f"{kind} (job's pick)" if kind == auto else kind
        _, shards, _ = one(name, lambda kind=kind: [VectorIndex.build(image, icfg, kind=kind)])
        if args.batch_sweep:
            wrapper_rows += wrapper_cost(shards, queries, pseudo, cfg, args, n, name)
        if sweep and kind in ("ivf", "ivfpq"):
            searched = shards[0].image
            depths = args.rerank_sweep if kind == "ivfpq" and args.rerank_sweep else [searched.rerank_factor]
            for nprobe in args.nprobe_sweep:
                for depth in depths:
                    searched.set_nprobe(nprobe, icfg)
                    searched.rerank_factor = depth
                    ids = run_queries(shards, queries, pseudo, cfg, REFERENCE_BATCH)[0]
                    row = {"rows": n, "kind": kind, "nprobe": nprobe, "rerank_factor": depth,
                           f"recall@{RECALL_AT}": recall(ids, ref["ids"], RECALL_AT)}
                    for t in args.threads:
                        row[f"qps_{t}t"] = queries_per_s(shards, queries, pseudo, cfg, args.batch_size, t,
                                                         args.repeats)[0]
                    sweep_rows.append(row)
                    print(row, flush=True)
        del shards
        gc.collect()

    for kind in dict.fromkeys(["flat", auto]):
        shard_cfg = icfg.model_copy(update={"shards": args.shards})
        row, shards, (ids, fused, _) = one(f"{args.shards} {kind} shards, merged",
                                           lambda kind=kind, c=shard_cfg: build_shards(image, c, kind=kind))
        del shards
        gc.collect()
        identical, tied = same_answer(ids, fused, ref["ids"], ref["fused"])
        row.update(rows_identical_to_exact=identical, rows_differing_only_by_ties=tied)
        if kind == "flat":
            ok = identical + tied == len(queries)
            shard_rows.append({"rows": n, "shards": args.shards, "queries": len(queries), "identical": identical,
                               "ties_only": tied, "same_top_k": ok})
            if not ok:
                raise AssertionError(f"{args.shards} merged flat shards differ from the single exact index on "
                                     f"{len(queries) - identical - tied} of {len(queries)} queries at {n} rows")
    logging.info("%d rows done", n)
    return rows, shard_rows, sweep_rows, wrapper_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=counts, default=counts("100k,1M"), help="knowledge-base rows")
    ap.add_argument("--dim", type=int, default=LatentMixture.dim)
    ap.add_argument("--queries", type=count, default=2000)
    ap.add_argument("--batch-size", type=int, default=RetrieveNeighbours.RESOURCES.batch_size,
                    help="queries per call (the retrieval actor's batch size)")
    ap.add_argument("--kinds", type=lambda s: s.split(","), default=["auto", "ivf"],
                    help="index kinds besides exact: auto (the job's pick), ivf, ivfpq, hnsw")
    ap.add_argument("--shards", type=int, default=4, help="shards for the merged path")
    ap.add_argument("--threads", type=lambda t: [int(x) for x in t.split(",")], default=sorted({1, os.cpu_count()}),
                    help="FAISS thread counts to time (a retrieval actor with a fractional CPU gets one)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per setting; the median is reported")
    ap.add_argument("--flat-timing-queries", type=count, default=256,
                    help="queries timed on exhaustive (flat) indexes, whose answers use every query")
    ap.add_argument("--batch-sweep", type=lambda s: [int(x) for x in s.split(",") if x], default=[64, 256, 1024],
                    help="query batch sizes at which fusion retrieval is timed against raw FAISS (empty: skip)")
    ap.add_argument("--nprobe-sweep", type=lambda s: [int(x) for x in s.split(",") if x], default=[],
                    help="nprobe values to sweep for each IVF kind at the largest size (e.g. 8,16,32,64)")
    ap.add_argument("--rerank-sweep", type=lambda s: [int(x) for x in s.split(",") if x], default=[],
                    help="IVF-PQ rerank depths (candidates per result) to sweep at each --nprobe-sweep value "
                    "(default: the IndexConfig's)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    gen = LatentMixture(dim=args.dim)
    cfg = RetrievalConfig(n_results=RECALL_AT)  # the job's retrieval with the top-10 kept, for recall@10
    rows, shard_rows, sweep, wrapper = [], [], [], []
    for n in args.sizes:
        r, s, w, c = bench_size(n, args, gen, cfg, sweep=n == max(args.sizes))
        rows, shard_rows, sweep, wrapper = rows + r, shard_rows + s, sweep + w, wrapper + c
    t_max = max(args.threads)
    picks = [r for r in rows if r["rows"] == TARGET_ROWS and "job's pick" in r["index"]]
    targets = [Target(f"{r['index']} at {r['rows']:,} rows: queries/s ({t_max} FAISS threads, median)",
                      r[f"qps_{t_max}t"], TARGET_QPS) for r in picks]
    targets += [Target(f"{r['index']} at {r['rows']:,} rows: recall@{RECALL_AT}", r[f"recall@{RECALL_AT}"],
                       TARGET_RECALL) for r in picks]
    job_batch = RetrieveNeighbours.RESOURCES.batch_size
    targets += [Target(f"{r['index']} at {r['rows']:,} rows, batch {r['batch']}: fusion retrieval / raw FAISS",
                       r["fusion/raw"], TARGET_WRAPPER_RATIO) for r in wrapper
                if r["batch"] == job_batch and "job's pick" in r["index"]]
    qps = [f"qps_{t}t" for t in args.threads]
    cols = ["rows", "index", "kind", "shards", "build_s", "faiss_mib", "rerank_vectors_mib", "timed_queries", *qps,
            f"recall@{RECALL_AT}", f"stage1_recall@{cfg.top_k}", "peak_rss_gib"]
    tables = {f"fusion retrieval (top_k={cfg.top_k}, n_results={cfg.n_results}, batch {args.batch_size}; "
              f"qps_Nt: median queries/s with N FAISS threads over {args.repeats} passes)": (rows, cols),
              "sharded exact search against one exact index": (shard_rows, ["rows", "shards", "queries",
                                                                             "identical", "ties_only", "same_top_k"])}
    if wrapper:
        tables[f"fusion retrieval against raw FAISS top-{cfg.top_k} on the same index and queries, by query batch "
               f"({max(args.threads)} threads; the job's batch: {job_batch})"] = (wrapper, list(wrapper[0]))
    if sweep:
        tables["nprobe sweep (each IVF kind at the largest size)"] = (
            sweep, ["rows", "kind", "nprobe", "rerank_factor", *qps, f"recall@{RECALL_AT}"])
    report("retrieval", tables, {"args": vars(args), "generator": asdict(gen), "pseudo_noise": PSEUDO_NOISE,
                                 "index_config": IndexConfig().model_dump(), "retrieval_config": cfg.model_dump()},
           targets)


if __name__ == "__main__":
    main()
