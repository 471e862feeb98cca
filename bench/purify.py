"""Purification at scale: cluster filtering and align() on clustered 512-d embeddings.

Times both steps at full size (default 1,000,000 external x 100,000 internal) with peak memory, and
compares align() with a straightforward dense reference (MUSE's procedure: full similarity blocks in
torch, four passes per round) at a size where the reference fits, checking both give the same W.
Targets: the full-size run (filter + align) within FULL_RUN_MAX_S and FULL_RUN_MAX_GIB, the same W as
the reference (Frobenius difference below W_TOLERANCE) and at least MIN_SPEEDUP times faster.

    python bench/purify.py                      # full size
    python bench/purify.py --external 100000 --internal 20000 --ref-external 20000 --ref-internal 10000
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (  # noqa: E402
    GENERATE_CHUNK_ROWS,
    Target,
    clustered_unit_vectors,
    count,
    measure,
    report,
    unit_rows,
)
from rag4dmc.pipeline.config import AlignConfig, FilterConfig  # noqa: E402
from rag4dmc.pipeline.core.alignment import align_with_report, procrustes  # noqa: E402
from rag4dmc.pipeline.core.cluster_filter import cluster_filter  # noqa: E402

MIN_CENTERS = 16  # at least this many shared centres (about sqrt(n_internal) otherwise)
OFF_DOMAIN_FRACTION = 0.1  # of the external rows, drawn around centres the internal corpus lacks
OFF_DOMAIN_CENTERS_FRACTION = 0.1  # off-domain centres per shared centre (at least MIN_OFF_CENTERS)
MIN_OFF_CENTERS = 4
CLUSTER_NOISE = 0.6  # per-dimension std around a centre (centres are standard normal)
ROTATION_SCALE = 0.01  # std of the skew-symmetric generator of the external corpus's rotation (||R - I||_F ~ 7 at 512-d)
OVERLAP_FRACTION = 1.0  # internal rows with a noisy copy among the external rows
COPY_NOISE = 0.05  # norm of a copy's noise relative to the unit row (cosine to the original ~0.999)
FULL_FILTER_NREDO = 1  # k-means starts in the full-size filter (FilterConfig.nredo multiplies its time)
REF_ROUNDS = 3  # refinement rounds of both sides of the reference comparison
REF_EPS = 1e-6  # small enough that both sides run every round
REF_BLOCK = 4096  # rows per dense similarity block in the reference
REF_SEED = 1
FULL_RUN_MAX_S = 600.0
FULL_RUN_MAX_GIB = 12.0
W_TOLERANCE = 1e-3
MIN_SPEEDUP = 3.0


def clustered_corpus(n_internal: int, n_external: int, d: int, seed: int = 0):
    """Internal and external embeddings around shared centres, the external corpus rotated by R (a
    domain shift); returns (internal, external, off-domain rows at the end of external, R).

    OFF_DOMAIN_FRACTION of the external rows lie around centres the internal corpus lacks. Of the rest,
    up to OVERLAP_FRACTION x n_internal are noisy copies of internal rows (the planted overlap that
    determines R: without it only the centres' span is constrained and any W fits the other directions),
    and the others fresh draws around the shared centres."""
    rng = np.random.default_rng(seed)
    n_centers = max(MIN_CENTERS, int(np.sqrt(n_internal)))
    centers = rng.standard_normal((n_centers, d), dtype=np.float32)
    off = rng.standard_normal((max(MIN_OFF_CENTERS, int(n_centers * OFF_DOMAIN_CENTERS_FRACTION)), d),
                              dtype=np.float32)
    internal = clustered_unit_vectors(n_internal, centers, CLUSTER_NOISE, rng)
    n_off = int(n_external * OFF_DOMAIN_FRACTION)
    n_copies = min(int(OVERLAP_FRACTION * n_internal), n_external - n_off)
    external = np.empty((n_external, d), np.float32)
    copied = rng.permutation(n_internal)[:n_copies]
    for s in range(0, n_copies, GENERATE_CHUNK_ROWS):
        src = internal[copied[s : s + GENERATE_CHUNK_ROWS]]
        external[s : s + len(src)] = unit_rows(src + COPY_NOISE / np.sqrt(d) * rng.standard_normal(src.shape,
                                                                                                    dtype=np.float32))
    clustered_unit_vectors(n_external - n_off - n_copies, centers, CLUSTER_NOISE, rng,
                           out=external[n_copies : n_external - n_off])
    clustered_unit_vectors(n_off, off, CLUSTER_NOISE, rng, out=external[n_external - n_off :])
    skew = rng.standard_normal((d, d)).astype(np.float32) * ROTATION_SCALE
    rot = torch.linalg.matrix_exp(torch.from_numpy(skew - skew.T)).numpy()
    for s in range(0, len(external), GENERATE_CHUNK_ROWS):
        external[s : s + GENERATE_CHUNK_ROWS] = external[s : s + GENERATE_CHUNK_ROWS] @ rot
    return internal, external, n_off, rot


def dense_reference(internal: np.ndarray, external: np.ndarray, k: int, rounds: int, eps: float,
                    block: int = REF_BLOCK):
    """MUSE-style refinement: CSLS from dense similarity blocks (torch), identity start, mutual pairs."""
    src, tgt = torch.from_numpy(external), torch.from_numpy(internal)

    def topk_mean(a, b):
        return torch.cat([(a[s : s + block] @ b.T).topk(k, dim=1).values.mean(1) for s in range(0, len(a), block)])

    def csls_nn(a, b, r_b):
        return torch.cat([(2 * (a[s : s + block] @ b.T) - r_b[None]).argmax(1) for s in range(0, len(a), block)])

    w = torch.eye(src.shape[1])
    for _ in range(rounds):
        x = src @ w
        r_x, r_t = topk_mean(x, tgt), topk_mean(tgt, x)
        nn_xt, nn_tx = csls_nn(x, tgt, r_t), csls_nn(tgt, x, r_x)
        i = torch.nonzero(nn_tx[nn_xt] == torch.arange(len(x))).squeeze(1)
        w_next = torch.from_numpy(procrustes(external[i.numpy()], internal[nn_xt[i].numpy()]))
        delta = float(torch.linalg.norm(w_next - w))
        w = w_next
        if delta < eps:
            break
    return w.numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--internal", type=count, default=100_000)
    ap.add_argument("--external", type=count, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--ref-internal", type=count, default=20_000)
    ap.add_argument("--ref-external", type=count, default=50_000)
    ap.add_argument("--skip-reference", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows, payload, targets = [], {"args": vars(args)}, []
    acfg, fcfg = AlignConfig(), FilterConfig()

    internal, external, n_off, rot = clustered_corpus(args.internal, args.external, args.dim)
    with measure() as m_filter:
        res = cluster_filter(internal, external, tau_cent=fcfg.tau_cent, tau_inst=fcfg.tau_inst, niter=fcfg.niter,
                             nredo=FULL_FILTER_NREDO)
    off_kept = int(res.keep[len(external) - n_off :].sum())
    rows.append({"step": "cluster_filter", "internal": args.internal, "external": args.external,
                 "seconds": m_filter.seconds, "peak_rss_gib": m_filter.peak_rss_gib,
                 "note": f"kept {res.report.instances_kept}, off-domain kept {off_kept} of {n_off}, "
                         f"{FULL_FILTER_NREDO} k-means start(s)"})
    kept = external[res.keep]
    with measure() as m_align:
        ar = align_with_report(internal, kept, k=acfg.csls_k, max_rounds=acfg.max_rounds, eps=acfg.eps,
                               max_rows=acfg.max_rows, proximal=acfg.proximal, init="identity")
    rows.append({"step": "align", "internal": args.internal, "external": len(kept), "seconds": m_align.seconds,
                 "peak_rss_gib": m_align.peak_rss_gib,
                 "note": f"{len(ar.report.rounds)} rounds, criterion {ar.report.best_criterion:.4f}, "
                         f"pairs induced on {acfg.max_rows} rows/side, ||W - R^T||_F "
                         f"{np.linalg.norm(ar.W - rot.T):.3g} (identity: {np.linalg.norm(np.eye(args.dim) - rot.T):.3g})"})
    payload["full"] = {"filter": res.report.to_dict(), "align": ar.report.to_dict()}
    full = f"{args.internal:,} internal x {args.external:,} external"
    targets += [Target(f"filter + align time, {full}", m_filter.seconds + m_align.seconds, FULL_RUN_MAX_S,
                       at_least=False, unit=" s"),
                Target(f"filter + align peak RSS, {full}", max(m_filter.peak_rss_gib, m_align.peak_rss_gib),
                       FULL_RUN_MAX_GIB, at_least=False, unit=" GiB")]
    del internal, external, kept

    if not args.skip_reference:
        internal, external, _, rot = clustered_corpus(args.ref_internal, args.ref_external, args.dim, seed=REF_SEED)
        with measure() as m_ours:
            ours = align_with_report(internal, external, k=acfg.csls_k, max_rounds=REF_ROUNDS, eps=REF_EPS,
                                     init="identity", max_rows=None, proximal=0.0)  # MUSE's plain step
        with measure() as m_ref:
            ref = dense_reference(internal, external, k=acfg.csls_k, rounds=REF_ROUNDS, eps=REF_EPS)
        diff = float(np.linalg.norm(ours.W - ref))
        for name, m in (("align (FAISS blocks)", m_ours), ("dense reference (torch)", m_ref)):
            rows.append({"step": name, "internal": args.ref_internal, "external": args.ref_external,
                         "seconds": m.seconds, "peak_rss_gib": m.peak_rss_gib,
                         "note": f"{REF_ROUNDS} rounds, all rows, ||W - R^T||_F "
                                 f"{np.linalg.norm((ours.W if m is m_ours else ref) - rot.T):.3g}"})
        payload["reference"] = {"frobenius_diff": diff, "speedup": m_ref.seconds / m_ours.seconds,
                                "ours_minus_planted": float(np.linalg.norm(ours.W - rot.T)),
                                "reference_minus_planted": float(np.linalg.norm(ref - rot.T))}
        size = f"{args.ref_internal:,} x {args.ref_external:,}"
        targets += [Target(f"||W_ours - W_reference||_F at {size}", diff, W_TOLERANCE, at_least=False),
                    Target(f"align speed-up over the dense reference at {size}", m_ref.seconds / m_ours.seconds,
                           MIN_SPEEDUP, unit="x")]
    report("purify", {"purification": (rows, ["step", "internal", "external", "seconds", "peak_rss_gib", "note"])},
           payload, targets)


if __name__ == "__main__":
    main()
