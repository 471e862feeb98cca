"""Purification: Procrustes, CSLS mutual pairs, iterative alignment, cluster filtering."""

import numpy as np
import pytest
from scipy.linalg import expm

from rag4dmc.pipeline.core.alignment import (
    align,
    align_with_report,
    csls_mutual_pairs,
    polar,
    procrustes,
    proximal_procrustes,
)
from rag4dmc.pipeline.core.cluster_filter import cluster_filter
from rag4dmc.pipeline.core.knn import EmbeddingError, knn
from tests.planted import clustered, rotation, unit

D = 64


def test_procrustes_recovers_a_random_rotation_from_noisy_rotated_copies():
    rng = np.random.default_rng(0)
    R = rotation(D, seed=1)
    x = unit(rng.normal(size=(2000, D)))
    w = procrustes(x, x @ R + 0.01 * rng.normal(size=x.shape).astype(np.float32))
    assert np.linalg.norm(w - R) < 0.2  # a random orthogonal matrix is ~sqrt(2d) = 11 away
    np.testing.assert_allclose(w @ w.T, np.eye(D), atol=1e-4)


def test_procrustes_rejects_unpaired_or_broken_input():
    x = np.ones((5, 4), np.float32)
    with pytest.raises(EmbeddingError, match="paired rows"):
        procrustes(x, x[:4])
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(EmbeddingError, match="NaN or inf"):
        procrustes(bad, x)


def test_csls_mutual_pairs_recover_a_hidden_permutation():
    rng = np.random.default_rng(0)
    a = unit(rng.normal(size=(500, D)))
    perm = rng.permutation(500)
    b = unit(a[perm] + 0.02 * rng.normal(size=a.shape))
    i, j = csls_mutual_pairs(a, b, k=10)
    assert len(i) >= 490
    np.testing.assert_array_equal(perm[j], i)  # b[j] is a noisy copy of a[i]


def test_csls_avoids_a_hub_that_plain_nearest_neighbour_picks():
    rng = np.random.default_rng(0)
    common = unit(rng.normal(size=(1, D)))
    a = unit(common + rng.normal(size=(300, D)) / np.sqrt(D))  # cos(a_i, common) ~ 0.71
    b = unit(a + 1.2 * rng.normal(size=a.shape) / np.sqrt(D))  # cos(a_i, b_i) ~ 0.64
    b = np.vstack([b, common])  # row 300 is a hub: nearer to most a_i than their own b_i
    _, nn = knn(a, b, 1)
    assert (nn[:, 0] == 300).mean() > 0.5
    i, j = csls_mutual_pairs(a, b, k=10)
    assert len(i) > 250 and (i == j).mean() > 0.99  # each a_i pairs with its own b_i, not the hub


def _dense_csls_pairs(a, b, k):
    """CSLS mutual nearest neighbours from the full similarity matrix: the definition, for small sets."""
    s = a @ b.T
    r_a = np.sort(s, axis=1)[:, -k:].mean(axis=1)
    r_b = np.sort(s, axis=0)[-k:].mean(axis=0)
    csls = 2 * s - r_a[:, None] - r_b[None, :]
    nn_ab, nn_ba = csls.argmax(axis=1), csls.argmax(axis=0)
    i = np.flatnonzero(nn_ba[nn_ab] == np.arange(len(a)))
    return i, nn_ab[i]


@pytest.mark.parametrize("fetch_factor", [1, 2, 10])
def test_csls_pairs_equal_the_dense_definition_with_anti_hubs_and_short_lists(monkeypatch, fetch_factor):
    """The certified shortcut must give exactly the dense answer, also when few neighbours are fetched
    (many queries uncertified) and off-domain rows with low r would loosen a global bound."""
    import rag4dmc.pipeline.core.alignment as alignment

    rng = np.random.default_rng(3)
    centers = rng.normal(size=(12, D)) * 2
    a, _ = clustered(rng, centers, 700, 0.8)
    b, _ = clustered(rng, centers, 500, 0.8)
    off, _ = clustered(rng, rng.normal(size=(3, D)) * 2, 80, 0.8)  # anti-hubs: low r on either side
    a, b = np.vstack([a, off[:40]]), np.vstack([b, off[40:]])
    monkeypatch.setattr(alignment, "CSLS_FETCH_FACTOR", fetch_factor)
    got_i, got_j = csls_mutual_pairs(a, b, k=10)
    want_i, want_j = _dense_csls_pairs(a.astype(np.float64), b.astype(np.float64), 10)
    assert len(want_i) > 100
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_j, want_j)


def test_csls_k_larger_than_the_sets_is_clamped():
    rng = np.random.default_rng(1)
    a = unit(rng.normal(size=(5, 8)))
    i, j = csls_mutual_pairs(a, a, k=50)
    np.testing.assert_array_equal(i, j)
    assert len(i) == 5


@pytest.mark.parametrize(
    "broken, message",
    [
        (np.zeros((4, D), np.float32), "zero vectors"),
        (np.full((4, D), np.inf, np.float32), "NaN or inf"),
        (np.ones((4, D + 1), np.float32), "dims"),
        (np.ones((0, D), np.float32), "empty"),
    ],
)
def test_alignment_and_pairs_refuse_unusable_embeddings(broken, message):
    good = unit(np.random.default_rng(0).normal(size=(10, D)))
    with pytest.raises(EmbeddingError, match=message):
        csls_mutual_pairs(good, broken)
    with pytest.raises(EmbeddingError, match=message):
        align(good, broken)


def _overlapping_sets(seed: int = 0, noise: float = 0.15):
    """Internal rows 0..2000 and external rows 1000..3000 of one clustered cloud, external rotated by R^T."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(200, D))
    x, _ = clustered(rng, centers, 3000, noise)
    R = rotation(D, seed=seed + 1)
    external = (x[1000:3000] @ R.T)[rng.permutation(2000)]
    return x[:2000], external, R


def test_align_recovers_a_random_rotation_from_unpaired_shuffled_rows():
    internal, external, R = _overlapping_sets()
    result = align_with_report(internal, external, k=10, max_rounds=12, eps=1e-4)
    assert np.linalg.norm(result.W - R) < 0.5
    rounds = result.report.rounds
    assert result.report.best_criterion == max(r.criterion for r in rounds)
    assert rounds[result.report.best_round].criterion == result.report.best_criterion
    assert rounds[-1].n_pairs > rounds[0].n_pairs  # refinement finds more mutual pairs
    assert result.report.best_criterion > 0.95  # the planted overlap is found: its copies have cosine 1


def test_align_keeps_the_best_round_and_stops_when_w_settles():
    internal, external, _ = _overlapping_sets(seed=3)
    report = align_with_report(internal, external, max_rounds=30, eps=1e-3).report
    deltas = [r.delta_fro for r in report.rounds[1:]]
    assert report.converged and deltas[-1] < 1e-3
    assert len(report.rounds) < 31


def test_align_from_identity_corrects_a_small_domain_rotation():
    rng = np.random.default_rng(5)
    centers = rng.normal(size=(300, D))  # enough structure to pin down every direction
    internal, _ = clustered(rng, centers, 3000, 0.2)
    external, _ = clustered(rng, centers, 3000, 0.2)  # the same domain, no shared rows
    skew = rng.normal(size=(D, D)) * 0.02
    R = expm(skew - skew.T).astype(np.float32)  # a small proper rotation
    result = align_with_report(internal, external @ R.T, init="identity")
    assert np.linalg.norm(result.W - R) < 0.5 * np.linalg.norm(np.eye(D) - R)


def _filter_world(seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(12, D)) * 2
    internal, _ = clustered(rng, centers, 3000, 0.6)
    ext_in, _ = clustered(rng, centers + 0.2 * rng.normal(size=centers.shape), 2000, 0.6)  # shifted domain
    ext_off, _ = clustered(rng, rng.normal(size=(5, D)) * 2, 1000, 0.6)  # off-domain clusters
    external = np.vstack([ext_in, ext_off])
    in_domain = np.r_[np.ones(2000, bool), np.zeros(1000, bool)]
    return internal, external, in_domain


def test_cluster_filter_drops_planted_off_domain_clusters_and_keeps_in_domain_ones():
    internal, external, in_domain = _filter_world()
    res = cluster_filter(internal, external, tau_cent=0.5, tau_inst=0.3)
    kept = res.keep
    precision = (kept & in_domain).sum() / kept.sum()
    recall = (kept & in_domain).sum() / in_domain.sum()
    assert precision >= 0.95 and recall >= 0.95
    r = res.report
    assert r.clusters_kept + r.clusters_dropped == r.n_external_clusters
    assert r.instances_kept + r.instances_dropped_by_cluster + r.instances_dropped_by_instance == len(external)
    assert r.clusters_dropped > 0


def test_cluster_filter_drops_far_instances_inside_kept_clusters():
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(3, D)) * 2
    internal, _ = clustered(rng, centers, 1500, 0.6)
    external, _ = clustered(rng, centers, 1000, 0.6)
    # Outliers that lean towards one in-domain cluster but sit far from its centre.
    outliers = unit(0.3 * external[:50] + rng.normal(size=(50, D)) / np.sqrt(D) * 2.0)  # cos ~ 0.15
    res = cluster_filter(internal, np.vstack([external, outliers]), tau_cent=0.5, tau_inst=0.3,
                         n_clusters_internal=3, n_clusters_external=3)  # too few clusters to isolate them
    assert res.report.clusters_dropped == 0
    assert res.keep[:-50].mean() > 0.98
    assert res.keep[-50:].mean() < 0.1
    assert res.report.instances_dropped_by_instance >= 45


def test_proximal_step_keeps_unconstrained_directions_and_shares_procrustes_fixed_points():
    rng = np.random.default_rng(2)
    x, y = unit(rng.normal(size=(3000, D))), unit(rng.normal(size=(3000, D)))  # unrelated "pairs"
    plain = np.linalg.norm(procrustes(x, y) - np.eye(D))  # plain Procrustes turns at random
    assert plain > 8.0
    assert np.linalg.norm(proximal_procrustes(x, y, np.eye(D), 0.3) - np.eye(D)) < 0.3 * plain
    R = rotation(D, seed=4)
    np.testing.assert_allclose(proximal_procrustes(x, x @ R, R, 0.3), R, atol=1e-4)  # a fixed point stays


def test_a_proximal_step_on_fewer_pairs_than_half_the_dimensions_is_the_full_svds_polar_factor():
    """Few pairs (the usual held-out calibration sample against a 1280-d image tower) take the low-rank route
    (polar_near); the polar factor of a nonsingular matrix is unique, so it must be what the full SVD gives."""
    rng = np.random.default_rng(5)
    d = 256
    w = rotation(d, seed=6)
    for n in (3, 40, 127):  # all under d / 2
        x = unit(rng.normal(size=(n, d)))
        y = unit(x @ w + 0.5 * rng.normal(size=(n, d)))
        full = polar(x.astype(np.float64).T @ y + 0.3 * (n / d) * w)
        fast = proximal_procrustes(x, y, w, 0.3)
        np.testing.assert_allclose(fast, full, atol=1e-5)
        np.testing.assert_allclose(fast.T @ fast, np.eye(d), atol=1e-5)
    assert np.linalg.norm(full - w) > 0.1  # the pairs did turn it: the check is not of W against itself


def _muse_refinement(internal, external, k=10, rounds=5):
    """A plain MUSE-style refinement (dico_builder + trainer.procrustes), dense, from the identity: each round
    the mutual CSLS nearest neighbours under W give the pairs, and Procrustes on them the next W."""
    w = np.eye(internal.shape[1])
    for _ in range(rounds):
        i, j = _dense_csls_pairs(external @ w, internal, k)
        w = procrustes(external[i], internal[j])
    return w


def test_align_without_the_proximal_step_reaches_muses_fixed_point_on_a_planted_rotation():
    rng = np.random.default_rng(5)
    d = 64
    internal = unit(rng.normal(size=(2000, d)))
    skew = rng.normal(size=(d, d)) * 0.03
    rot = expm(skew - skew.T)
    unrelated = unit(rng.normal(size=(900, d)))
    external = np.vstack([unit(internal @ rot.T + 0.02 * rng.normal(size=(2000, d))), unrelated]).astype(np.float32)
    reference = _muse_refinement(internal, external)
    result = align_with_report(internal, external, k=10, max_rounds=5, init="identity", proximal=0.0, pick="last",
                               max_rows=None)
    assert np.linalg.norm(result.W - reference) < 1e-3
    assert np.linalg.norm(result.W - rot) < np.linalg.norm(np.eye(d) - rot) / 4  # and it undid the rotation
    assert result.last is result.W and result.best.shape == (d, d)
