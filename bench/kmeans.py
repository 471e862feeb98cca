"""k-means for the cluster filter: FAISS (``rag4dmc.pipeline.core.cluster_filter.kmeans``) against scikit-learn's MiniBatchKMeans.

Both cluster the same unit-norm 512-d rows (``bench.common.LatentMixture``) into the number of clusters
the cluster filter uses for that many external rows (``rag4dmc.pipeline.core.cluster_filter.default_clusters``), with one start
each (``--nredo``; the filter's own default is ``FilterConfig.nredo``). Both results are scored by the
same code over every row:

* ``inertia``: sum of squared L2 distances to the nearest centroid as returned (FAISS's spherical
  k-means returns unit centroids, MiniBatchKMeans returns means, whose shorter norm lowers this figure
  on unit rows without grouping the rows any better);
* ``cos_objective``: mean of 1 - max cos(row, centroid / ||centroid||), what the cluster filter uses
  (it assigns rows to unit centroids by inner product). Lower is better for both.

FAISS trains on at most 256 rows per centroid (its default subsample); MiniBatchKMeans sees every row
in mini-batches and stops on its own criterion. Time and peak memory cover the fit only.

    python bench/kmeans.py                         # 100k and 1M rows
    python bench/kmeans.py --sizes 20k --nredo 1
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rag4dmc.pipeline  # noqa: E402,F401  (before faiss: names the CPU to its OpenBLAS, pipeline/blas.py)

# isort: split
import faiss  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import LatentMixture, counts, measure, report, unit_rows  # noqa: E402
from rag4dmc.pipeline.config import FilterConfig  # noqa: E402
from rag4dmc.pipeline.core.cluster_filter import EXTERNAL_CLUSTER_CAP, default_clusters, kmeans  # noqa: E402
from rag4dmc.pipeline.core.knn import search_blocks  # noqa: E402

MINIBATCH_ROWS = 1024  # scikit-learn's default batch_size
SEED = 0


def objectives(x: np.ndarray, centroids: np.ndarray) -> dict:
    """Inertia (squared L2 to the nearest centroid, summed) and the mean cosine gap to unit centroids."""
    l2 = faiss.IndexFlatL2(x.shape[1])
    l2.add(np.ascontiguousarray(centroids, np.float32))
    d2, _ = search_blocks(l2, x, 1)
    ip = faiss.IndexFlatIP(x.shape[1])
    ip.add(unit_rows(np.array(centroids, np.float32)))
    cos, _ = search_blocks(ip, x, 1)
    return {"inertia": float(d2.sum()), "cos_objective": float(np.mean(1.0 - cos[:, 0]))}


def fit_faiss(x: np.ndarray, k: int, niter: int, nredo: int) -> np.ndarray:
    return kmeans(x, k, niter=niter, seed=SEED, nredo=nredo)


def fit_minibatch(x: np.ndarray, k: int, nredo: int) -> tuple[np.ndarray, int]:
    from sklearn.cluster import MiniBatchKMeans

    km = MiniBatchKMeans(n_clusters=k, batch_size=MINIBATCH_ROWS, n_init=nredo, random_state=SEED)
    km.fit(x)
    return km.cluster_centers_.astype(np.float32), int(km.n_steps_)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=counts, default=counts("100k,1M"), help="rows to cluster")
    ap.add_argument("--dim", type=int, default=LatentMixture.dim)
    ap.add_argument("--niter", type=int, default=FilterConfig().niter, help="FAISS iterations (the filter's)")
    ap.add_argument("--nredo", type=int, default=1, help="starts for both (the filter uses FilterConfig.nredo)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    gen = LatentMixture(dim=args.dim)
    rows = []
    for n in args.sizes:
        (x,) = gen.sample(n, np.random.default_rng(SEED), modalities=1)
        k = default_clusters(n, EXTERNAL_CLUSTER_CAP)
        with measure() as m_faiss:
            c_faiss = fit_faiss(x, k, args.niter, args.nredo)
        logging.info("faiss: %d rows, k=%d, %.1f s", n, k, m_faiss.seconds)
        with measure() as m_mb:
            c_mb, steps = fit_minibatch(x, k, args.nredo)
        logging.info("minibatch: %d rows, k=%d, %.1f s", n, k, m_mb.seconds)
        fits = (("FAISS spherical (rag4dmc.pipeline.core.cluster_filter.kmeans)", m_faiss, c_faiss, f"{args.niter} iterations"),
                ("scikit-learn MiniBatchKMeans", m_mb, c_mb, f"{steps} steps of {MINIBATCH_ROWS} rows"))
        for name, m, c, note in fits:
            rows.append({"rows": n, "k": k, "method": name, "seconds": m.seconds, "peak_rss_gib": m.peak_rss_gib,
                         **objectives(x, c), "note": note})
        rows[-1]["speedup_faiss"] = m_mb.seconds / m_faiss.seconds
        del x
    report("kmeans", {f"k-means, {args.dim}-d unit rows, k = the cluster filter's default, {args.nredo} start(s)":
                      (rows, ["rows", "k", "method", "seconds", "peak_rss_gib", "inertia", "cos_objective",
                              "speedup_faiss", "note"])},
           {"args": vars(args), "faiss_threads": faiss.omp_get_max_threads()})


if __name__ == "__main__":
    main()
