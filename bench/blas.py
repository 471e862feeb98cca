"""FAISS's matrix products with the OpenBLAS kernels it picks by itself, and with the CPU named (pipeline/blas.py).

Each case runs in a fresh process, since OpenBLAS chooses its kernels once, when it loads: "as loaded" imports
FAISS before anything of ours, with ``OPENBLAS_CORETYPE`` unset (what FAISS does on its own on this CPU); "named"
imports ``pipeline`` first, as every entry point of ours does. The work is what the KB build spends its time on:
an exact top-100 search (CSLS), FAISS k-means, and ``alignment.csls_pairs`` itself.

    python bench/blas.py                  # 20k x 20k search and CSLS, k-means of 100k rows into 1,024 clusters
    python bench/blas.py --rows 50000     # the fit's own CSLS size (align.max_rows)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import REPO, Target, report  # noqa: E402

DIM = 512
CASE = r"""
import json, os, sys, time
sys.path.insert(0, {repo!r})
if sys.argv[1] == "named":
    import rag4dmc.pipeline  # noqa: F401
coretype_env = os.environ.get("OPENBLAS_CORETYPE")
import faiss, numpy as np
from rag4dmc.pipeline import blas
from rag4dmc.pipeline.core import alignment
from rag4dmc.pipeline.core.knn import knn
rows, km_rows, clusters, dim = {rows}, {km_rows}, {clusters}, {dim}
rng = np.random.default_rng(0)
latent = rng.standard_normal((rows, 32), dtype=np.float32)
proj = rng.standard_normal((32, dim), dtype=np.float32)
a = latent @ proj + 0.3 * rng.standard_normal((rows, dim), dtype=np.float32)
b = (latent + 0.2 * rng.standard_normal((rows, 32), dtype=np.float32)) @ proj
b += 0.3 * rng.standard_normal((rows, dim), dtype=np.float32)
a /= np.linalg.norm(a, axis=1, keepdims=True); b /= np.linalg.norm(b, axis=1, keepdims=True)
out = {{"cores": blas.openblas_cores(), "coretype_env": coretype_env}}
t = time.perf_counter(); knn(a, b, 100); out["search_s"] = time.perf_counter() - t
t = time.perf_counter(); pairs = alignment.csls_pairs(a, b, 10); out["csls_s"] = time.perf_counter() - t
out["csls_pairs"] = int(pairs.i.size)
x = rng.standard_normal((km_rows, dim), dtype=np.float32)
km = faiss.Kmeans(dim, clusters, niter=10, seed=0, max_points_per_centroid=10**9)
t = time.perf_counter(); km.train(x); out["kmeans_s"] = time.perf_counter() - t
print(json.dumps(out))
"""


def run_case(mode: str, rows: int, km_rows: int, clusters: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    code = CASE.format(repo=str(REPO), rows=rows, km_rows=km_rows, clusters=clusters, dim=DIM)
    done = subprocess.run([sys.executable, "-c", code, mode], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20_000, help="rows per side of the exact search and of CSLS")
    ap.add_argument("--kmeans-rows", type=int, default=100_000)
    ap.add_argument("--clusters", type=int, default=1024)
    args = ap.parse_args()
    results = {mode: run_case(mode, args.rows, args.kmeans_rows, args.clusters) for mode in ("as loaded", "named")}
    faiss_core = {mode: next((c["architecture"] for c in r["cores"] if "faiss" in c["filepath"]), "?")
                  for mode, r in results.items()}
    flop = {"search_s": 2.0 * args.rows * args.rows * DIM,
            "kmeans_s": 2.0 * args.kmeans_rows * args.clusters * DIM * 10}
    rows = []
    for mode, r in results.items():
        row = {"OpenBLAS": mode, "FAISS's kernels": faiss_core[mode], "OPENBLAS_CORETYPE": r["coretype_env"] or "-"}
        for key, label in (("search_s", "top-100 search s"), ("csls_s", "csls_pairs s"), ("kmeans_s", "k-means s")):
            row[label] = round(r[key], 2)
        row["search GFLOP/s"] = round(flop["search_s"] / r["search_s"] / 1e9, 1)
        row["k-means GFLOP/s"] = round(flop["kmeans_s"] / r["kmeans_s"] / 1e9, 1)
        rows.append(row)
    before, after = results["as loaded"], results["named"]
    speedup = before["csls_s"] / after["csls_s"]
    title = (f"exact search and CSLS at {args.rows:,} x {args.rows:,} x {DIM}, k-means {args.kmeans_rows:,} rows into "
             f"{args.clusters:,} clusters (10 iterations); each mode in a fresh process")
    report("blas", {title: (rows, list(rows[0]))},
           {"rows": args.rows, "kmeans_rows": args.kmeans_rows, "clusters": args.clusters, "results": results},
           [Target("csls_pairs speed-up from naming the CPU (1 where FAISS already picks fast kernels)", speedup,
                   1.0, unit="x")])


if __name__ == "__main__":
    main()
