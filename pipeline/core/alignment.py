"""Cross-domain alignment of the external knowledge base (RAG4DMC, Key Design 2, purification).

CSLS mutual nearest neighbours (Conneau et al. 2018) feed orthogonal Procrustes, iterated until the rotation
stops moving; ``external @ W`` lies in the internal space. Every nearest-neighbour query goes through FAISS in
blocks (``rag4dmc.pipeline.core.knn``): no N x M matrix.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from rag4dmc.pipeline.core.knn import (
    DEFAULT_BLOCK,
    EmbeddingError,
    check_matrix,
    flat_index,
    normalize_rows,
    same_dim,
    search_blocks,
)

log = logging.getLogger(__name__)

SIMILARITY_INIT_ROWS = 4000  # VecMap's sample size for the rotation-invariant initial dictionary
CSLS_FETCH_FACTOR = 10  # raw neighbours fetched per query: k * this; lets most CSLS argmaxes be certified
CSLS_LOW_R_QUANTILES = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3)  # splits tried by _csls_argmax's certificate


def _polar64(m: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(m.astype(np.float64))
    return u @ vt


def polar(m: np.ndarray) -> np.ndarray:
    """The orthogonal factor U V^T of M = U S V^T (the nearest orthogonal matrix to M)."""
    return _polar64(m).astype(np.float32)


def polar_near(w: np.ndarray, p: np.ndarray, q: np.ndarray, c: float) -> np.ndarray:
    """polar(c W + W p q^T) for an orthogonal W [d, d], p and q [d, n] and c > 0, at the cost of an SVD of size 2n.

    W^T M = c I + p q^T is c I outside the span of [p q]: with B an orthonormal basis of that span and
    K = c I + (B^T p)(q^T B), polar(M) = W (I + B (polar(K) - I) B^T). The polar factor of a nonsingular M is
    unique, so this is the full SVD's answer, for n pairs much fewer than d dimensions in a fraction of its time."""
    basis, _ = np.linalg.qr(np.hstack([p, q]))
    small = c * np.eye(basis.shape[1]) + (basis.T @ p) @ (q.T @ basis)
    turn = _polar64(small) - np.eye(basis.shape[1])
    return w + (w @ basis) @ turn @ basis.T


def procrustes(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """W* = argmin_{W orthogonal} ||source W - target||_F = U V^T, with U S V^T = SVD(source^T target)."""
    src = check_matrix(source, "source")
    tgt = check_matrix(target, "target")
    if src.shape != tgt.shape:
        raise EmbeddingError(f"procrustes needs paired rows of equal shape, got {src.shape} and {tgt.shape}")
    return polar(src.astype(np.float64).T @ tgt.astype(np.float64))


def proximal_procrustes(source: np.ndarray, target: np.ndarray, w_prev: np.ndarray, weight: float) -> np.ndarray:
    """polar(source^T target + weight * (n / d) * W_prev): Procrustes with a pull towards the previous W.

    It has the same fixed points as plain Procrustes, but directions the pairs do not constrain (noise
    subspaces, where source^T target is ~0) keep their previous rotation instead of turning at random.
    """
    n, d = source.shape
    src, tgt, w = source.astype(np.float64), target.astype(np.float64), w_prev.astype(np.float64)
    if weight > 0 and 2 * n < d:  # few pairs: M = c W + S^T T is c W but for a rank-n term (polar_near)
        return polar_near(w, w.T @ src.T, tgt.T, weight * (n / d)).astype(np.float32)
    return polar(src.T @ tgt + weight * (n / d) * w)


@dataclass(frozen=True)
class CslsPairs:
    """Mutual CSLS nearest neighbours: a[i[p]] <-> b[j[p]], with their CSLS score and cosine."""

    i: np.ndarray
    j: np.ndarray
    csls: np.ndarray
    cosine: np.ndarray


def _csls_argmax(
    queries: np.ndarray,
    top_sims: np.ndarray,
    top_ids: np.ndarray,
    r_other: np.ndarray,
    other: np.ndarray,
    block_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """argmax_j (2 cos(q, o_j) - r_other[j]) for every query: the CSLS nearest neighbour (Eq. 6).

    Exact, without scoring every pair. The fetched top-k list of each query gives a candidate; every j
    outside the list has 2 cos <= 2 * (k-th best cos), so with r_other[j] >= rho the candidate is certified
    when it beats 2 * (k-th best cos) - rho. The few rows with r_other < rho (off-domain rows and other
    anti-hubs, which would loosen the bound for everyone) are searched exactly for all queries, and rho is
    the quantile that minimises that search plus the queries left uncertified, which get an exact
    augmented inner-product search over [o_j, -r_other[j] / 2].
    """
    cand = 2.0 * top_sims - r_other[top_ids]
    pos = cand.argmax(axis=1)
    rows = np.arange(len(queries))
    best_id = top_ids[rows, pos]
    best = cand[rows, pos]
    if top_ids.shape[1] >= other.shape[0]:
        return best_id, best
    kth = 2.0 * top_sims[:, -1]
    # Cost of each split, in rows scanned per query: |low-r rows| + |other| * (uncertified fraction).
    quantiles = np.quantile(r_other, CSLS_LOW_R_QUANTILES)
    costs = [(r_other < rho).sum() + len(other) * (best < kth - rho).mean() for rho in quantiles]
    rho = quantiles[int(np.argmin(costs))]
    low = np.flatnonzero(r_other < rho)
    if low.size:
        low_id, low_score = _augmented_argmax(queries, other[low], r_other[low], block_size)
        better = low_score > best
        best_id[better], best[better] = low[low_id[better]], low_score[better]
    unsure = np.flatnonzero(best < kth - rho)
    log.debug("CSLS certificate: %d low-r rows searched exactly, %d of %d queries uncertified",
              low.size, unsure.size, len(queries))
    if unsure.size:
        best_id[unsure], best[unsure] = _augmented_argmax(queries[unsure], other, r_other, block_size)
    return best_id, best


def _augmented_argmax(queries: np.ndarray, other: np.ndarray, r_other: np.ndarray,
                      block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact argmax_j 2 q.o_j - r_other[j], as one inner-product search over rows [o_j, -r_other[j] / 2]."""
    augmented = np.hstack([other, (-0.5 * r_other)[:, None]]).astype(np.float32)
    q = np.hstack([queries, np.ones((len(queries), 1), np.float32)])
    score, ids = search_blocks(flat_index(augmented), q, 1, block_size)
    return ids[:, 0], 2.0 * score[:, 0]


def csls_pairs(a: np.ndarray, b: np.ndarray, k: int = 10, block_size: int = DEFAULT_BLOCK) -> CslsPairs:
    """Mutual CSLS nearest neighbours between the rows of a and b, with scores (Conneau et al. 2018, Eq. 6).

    Rows are L2-normalised first. k is clamped to the size of the smaller set (documented result).
    """
    a = normalize_rows(a, "a")
    b = normalize_rows(b, "b")
    same_dim(a, b, ("a", "b"))
    if k < 1:
        raise EmbeddingError(f"k must be >= 1, got {k}")
    k_ab, k_ba = min(k, len(b)), min(k, len(a))
    fetch_ab, fetch_ba = min(k * CSLS_FETCH_FACTOR, len(b)), min(k * CSLS_FETCH_FACTOR, len(a))
    sims_ab, ids_ab = search_blocks(flat_index(b), a, fetch_ab, block_size)
    sims_ba, ids_ba = search_blocks(flat_index(a), b, fetch_ba, block_size)
    r_a, r_b = sims_ab[:, :k_ab].mean(axis=1), sims_ba[:, :k_ba].mean(axis=1)
    nn_ab, score_ab = _csls_argmax(a, sims_ab, ids_ab, r_b, b, block_size)
    nn_ba, _ = _csls_argmax(b, sims_ba, ids_ba, r_a, a, block_size)
    i = np.flatnonzero(nn_ba[nn_ab] == np.arange(len(a)))
    j = nn_ab[i]
    cosine = np.einsum("nd,nd->n", a[i], b[j])
    return CslsPairs(i=i, j=j, csls=score_ab[i] - r_a[i], cosine=cosine)


def csls_mutual_pairs(a: np.ndarray, b: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays (i, j) of mutual CSLS nearest neighbours: a[i[p]] and b[j[p]] choose each other."""
    pairs = csls_pairs(a, b, k)
    return pairs.i, pairs.j


# --------------------------------------------------------------------------------------------------
# Iterative alignment
# --------------------------------------------------------------------------------------------------


@dataclass
class AlignRound:
    round: int
    criterion: float
    n_pairs: int
    delta_fro: float | None


@dataclass
class AlignReport:
    """What align() did, per round; goes into the knowledge base's purification report."""

    init: str
    rows_internal: int
    rows_external: int
    rounds: list[AlignRound] = field(default_factory=list)
    best_round: int = 0
    best_criterion: float = float("nan")
    converged: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class AlignResult:
    W: np.ndarray  # the picked round's rotation (``pick``)
    report: AlignReport
    best: np.ndarray  # the round with the best criterion
    last: np.ndarray  # the last round (MUSE's plain loop returns this one)


def criterion(pairs: CslsPairs, top: int) -> float:
    """MUSE's unsupervised model-selection criterion: mean cosine of the `top` best CSLS pairs."""
    if pairs.i.size == 0:
        return float("-inf")
    order = np.argsort(-pairs.csls)[:top]
    return float(pairs.cosine[order].mean())


def similarity_signatures(x: np.ndarray) -> np.ndarray:
    """Rotation-invariant row signatures: sorted rows of sqrt(X X^T), normalised (Artetxe et al. 2018)."""
    u, s, _ = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    sim = (u * s) @ u.T
    sim.sort(axis=1)
    sim /= np.linalg.norm(sim, axis=1, keepdims=True) + 1e-12
    sim -= sim.mean(axis=0, keepdims=True)
    sim /= np.linalg.norm(sim, axis=1, keepdims=True) + 1e-12
    return sim.astype(np.float32)


def similarity_init(internal: np.ndarray, external: np.ndarray, k: int, seed: int) -> np.ndarray:
    """An initial rotation that needs no pairs: Procrustes on mutual CSLS pairs of similarity signatures."""
    rng = np.random.default_rng(seed)
    n = min(len(internal), len(external), SIMILARITY_INIT_ROWS)
    si = np.sort(rng.choice(len(internal), n, replace=False))
    se = np.sort(rng.choice(len(external), n, replace=False))
    pairs = csls_pairs(similarity_signatures(external[se]), similarity_signatures(internal[si]), k)
    if pairs.i.size < 2:
        return np.eye(internal.shape[1], dtype=np.float32)
    return procrustes(external[se][pairs.i], internal[si][pairs.j])


def align_with_report(
    internal: np.ndarray,
    external: np.ndarray,
    k: int = 10,
    max_rounds: int = 5,
    eps: float = 1e-4,
    *,
    init: str = "auto",
    criterion_pairs: int = 10_000,
    max_rows: int | None = None,
    proximal: float = 0.3,
    pick: str = "best",
    seed: int = 0,
    block_size: int = DEFAULT_BLOCK,
) -> AlignResult:
    """Iterative CSLS + Procrustes refinement W_r = procrustes(ext[i], int[j]) over pairs found under W_(r-1).

    ``init``: "identity" (same encoder on both sides), "similarity" (no shared space assumed) or "auto"
    (whichever scores the higher criterion). ``max_rows`` caps the rows of each side used to induce the
    pairs (as MUSE caps its dictionary); the rotation is then applied to every row. ``proximal`` > 0
    refines with :func:`proximal_procrustes` (0 is MUSE's plain Procrustes step). ``pick``: return the
    best round by the criterion ("best") or the last one ("last", MUSE's fixed point); both are in the result.
    """
    internal = normalize_rows(internal, "internal")
    external = normalize_rows(external, "external")
    same_dim(internal, external, ("internal", "external"))
    if init not in ("auto", "identity", "similarity"):
        raise ValueError(f"init must be auto, identity or similarity, got {init!r}")
    if pick not in ("best", "last"):
        raise ValueError(f"pick must be best or last, got {pick!r}")
    if max_rounds < 1 or eps <= 0:
        raise ValueError(f"need max_rounds >= 1 and eps > 0, got {max_rounds}, {eps}")
    rng = np.random.default_rng(seed)
    if max_rows is not None and len(internal) > max_rows:
        internal = internal[np.sort(rng.choice(len(internal), max_rows, replace=False))]
    if max_rows is not None and len(external) > max_rows:
        external = external[np.sort(rng.choice(len(external), max_rows, replace=False))]

    def evaluate(w: np.ndarray) -> tuple[CslsPairs, float]:
        pairs = csls_pairs(external @ w, internal, k, block_size)
        return pairs, criterion(pairs, criterion_pairs)

    d = internal.shape[1]
    candidates = {"identity": np.eye(d, dtype=np.float32)}
    if init in ("auto", "similarity"):
        candidates["similarity"] = similarity_init(internal, external, k, seed)
    if init == "similarity":
        candidates.pop("identity")
    scored = {name: evaluate(w) for name, w in candidates.items()}
    chosen = max(scored, key=lambda name: scored[name][1])
    w, (pairs, crit) = candidates[chosen], scored[chosen]

    report = AlignReport(init=chosen, rows_internal=len(internal), rows_external=len(external))
    best_w, delta = w, None
    for r in range(max_rounds + 1):
        report.rounds.append(AlignRound(round=r, criterion=crit, n_pairs=int(pairs.i.size), delta_fro=delta))
        log.info("align round %d: criterion %.4f, %d mutual pairs, ||dW||_F %s", r, crit, pairs.i.size,
                 "-" if delta is None else f"{delta:.2e}")
        if crit > report.best_criterion or math.isnan(report.best_criterion):
            report.best_round, report.best_criterion, best_w = r, crit, w
        if (delta is not None and delta < eps) or r == max_rounds or pairs.i.size < 2:
            report.converged = delta is not None and delta < eps
            break
        src, tgt = external[pairs.i], internal[pairs.j]
        w_next = proximal_procrustes(src, tgt, w, proximal) if proximal > 0 else procrustes(src, tgt)
        delta = float(np.linalg.norm(w_next - w))
        w = w_next
        pairs, crit = evaluate(w)
    return AlignResult(W=best_w if pick == "best" else w, report=report, best=best_w, last=w)


ALIGN_OVERSAMPLE = 4  # external rows drawn per aligned row wanted: the filter drops some of them


def align_candidate_ids(n_external: int, max_rows: int | None, seed: int) -> np.ndarray:
    """External rows, in random order, from which the alignment's sample is taken (the kept ones, first first)."""
    size = n_external if max_rows is None else min(n_external, ALIGN_OVERSAMPLE * max_rows)
    if size >= n_external:
        return np.random.default_rng(seed).permutation(n_external).astype(np.int64)
    return np.random.default_rng(seed).choice(n_external, size, replace=False).astype(np.int64)


def first_kept(candidates: np.ndarray, kept: np.ndarray, max_rows: int | None) -> np.ndarray:
    """The first ``max_rows`` candidates the filter kept, sorted: the external rows the rotation is fitted on."""
    chosen = candidates[kept]
    return np.sort(chosen if max_rows is None else chosen[:max_rows])


def align(
    internal: np.ndarray, external: np.ndarray, k: int = 10, max_rounds: int = 5, eps: float = 1e-4, **kwargs
) -> np.ndarray:
    """The orthogonal W with ``external @ W`` in the internal space (iterative CSLS + Procrustes)."""
    return align_with_report(internal, external, k, max_rounds, eps, **kwargs).W
