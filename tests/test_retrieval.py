"""Two-stage fusion retrieval against the paper's baselines, on embeddings with a planted modality gap."""

import numpy as np
import pytest

from rag4dmc.pipeline.config import MappingConfig, RetrievalConfig
from rag4dmc.pipeline.core.knn import EmbeddingError
from rag4dmc.pipeline.core.mapping import train_mapping
from rag4dmc.pipeline.core.retrieval import Neighbours, finish_retrieval, fusion_scores, retrieve
from tests.planted import unit

D = 32


@pytest.fixture(scope="module")
def world():
    """KB pairs and image-only queries; text = a linear distortion of the latent plus an offset (the gap)."""
    rng = np.random.default_rng(0)
    n = 1500
    latent = rng.normal(size=(n, D))
    distort = np.eye(D) + 0.8 * rng.normal(size=(D, D)) / np.sqrt(D)
    gap = 3.0 * unit(rng.normal(size=(1, D)))

    def image(z):
        return unit(z + 0.9 * rng.normal(size=z.shape))

    def text(z):
        return unit(z @ distort + gap * np.sqrt(D) / 4 + 0.9 * rng.normal(size=z.shape))

    kb_img, kb_txt = image(latent), text(latent)
    truth = rng.choice(n, 300, replace=False)
    queries = image(latent[truth])  # a fresh view of a KB item's image; its text is what we want
    mapping, _ = train_mapping(kb_img, kb_txt, MappingConfig(hidden_dim=128, max_epochs=80, lr=3e-3))
    return kb_img, kb_txt, queries, mapping.image_to_text(queries), truth


def r_at_1(neigh, truth):
    return float((neigh.ids[:, 0] == truth).mean())


def test_fusion_beats_direct_cross_modal_and_intra_only_retrieval(world):
    kb_img, kb_txt, q, pseudo, truth = world
    fusion = retrieve(q, pseudo, kb_img, kb_txt, RetrievalConfig(mode="fusion", top_k=20, alpha=0.5))
    cross = retrieve(q, pseudo, kb_img, kb_txt, RetrievalConfig(mode="cross"))
    intra = retrieve(q, pseudo, kb_img, kb_txt, RetrievalConfig(mode="intra"))
    assert r_at_1(fusion, truth) > r_at_1(cross, truth) + 0.2
    assert r_at_1(fusion, truth) > r_at_1(intra, truth) + 0.03


def test_scores_are_the_fused_cosines_in_descending_order(world):
    kb_img, kb_txt, q, pseudo, _ = world
    res = retrieve(q[:20], pseudo[:20], kb_img, kb_txt, RetrievalConfig(alpha=0.3, top_k=10, n_results=5))
    intra = np.einsum("nd,nkd->nk", q[:20], kb_img[res.ids])
    cross = np.einsum("nd,nkd->nk", pseudo[:20], kb_txt[res.ids])
    np.testing.assert_allclose(res.intra, intra, atol=1e-5)
    np.testing.assert_allclose(res.cross, cross, atol=1e-5)
    np.testing.assert_allclose(res.fused, 0.3 * intra + 0.7 * cross, atol=1e-5)
    assert (np.diff(res.fused, axis=1) <= 1e-6).all()


@pytest.mark.parametrize("mode", ["fusion", "intra", "mapped", "cross"])
def test_both_terms_are_the_cosines_of_the_returned_rows_in_every_mode(world, mode):
    # Stage 1's score stands in for one term where it is that term (fusion, intra: the query's; mapped: the
    # pseudo-embedding's); every mode must still report both terms of each row as its true cosines.
    kb_img, kb_txt, q, pseudo, _ = world
    res = retrieve(q[:20], pseudo[:20], kb_img, kb_txt, RetrievalConfig(mode=mode, top_k=10, n_results=5))
    np.testing.assert_allclose(res.intra, np.einsum("nd,nkd->nk", q[:20], kb_img[res.ids]), atol=1e-5)
    np.testing.assert_allclose(res.cross, np.einsum("nd,nkd->nk", pseudo[:20], kb_txt[res.ids]), atol=1e-5)


def test_alpha_one_reduces_to_intra_modal_ranking(world):
    kb_img, kb_txt, q, pseudo, _ = world
    a = retrieve(q, pseudo, kb_img, kb_txt, RetrievalConfig(alpha=1.0, top_k=4, n_results=4))
    b = retrieve(q, pseudo, kb_img, kb_txt, RetrievalConfig(mode="intra", n_results=4))
    np.testing.assert_array_equal(a.ids, b.ids)


def test_stage_two_is_a_pure_function_of_the_merged_candidates():
    same = unit(np.eye(4)[[0, 1, 2]] + 0.01)
    other = unit(np.eye(4)[[3, 2, 1]] + 0.01)
    q, p = same[:1], other[2:3]  # looks like row 0, its text looks like row 2's
    ids = np.array([[0, 2, -1]])
    intra, cross = q @ same[[0, 2, 0]].T, p @ other[[0, 2, 0]].T
    intra[:, 2] = cross[:, 2] = -np.inf  # padding
    cand = Neighbours(ids=ids, fused=intra.copy(), intra=intra, cross=cross)
    res = finish_retrieval(cand, RetrievalConfig(alpha=0.4, top_k=3, n_results=3))
    assert list(res.ids[0]) == [2, 0, -1]
    assert np.isneginf(res.fused[0, 2])
    np.testing.assert_allclose(fusion_scores(np.array([1.0]), np.array([0.0]), 0.4), [0.4])


def test_cross_mode_needs_a_shared_space_and_empty_kb_is_refused():
    rng = np.random.default_rng(0)
    img, txt = unit(rng.normal(size=(10, 8))), unit(rng.normal(size=(10, 6)))
    with pytest.raises(EmbeddingError, match="shared image-text space"):
        retrieve(img[:2], txt[:2], img, txt, RetrievalConfig(mode="cross"))
    res = retrieve(img[:2], txt[:2], img, txt, RetrievalConfig(mode="mapped", n_results=3))
    assert res.ids.shape == (2, 3)
    with pytest.raises(EmbeddingError, match="empty"):
        retrieve(img[:2], txt[:2], img[:0], txt[:0])


def test_cross_mode_runs_through_the_sharded_search_in_a_shared_space():
    """CLIP-like: image and text share a space, so the raw query can search the other modality's index."""
    from rag4dmc.pipeline.core.index import VectorIndex
    from rag4dmc.pipeline.core.retrieval import Shard, search

    rng = np.random.default_rng(3)
    latent = unit(rng.normal(size=(200, 8)))
    img, txt = unit(latent + 0.05 * rng.normal(size=latent.shape)), unit(latent + 0.05 * rng.normal(size=latent.shape))
    halves = [Shard(a, b, VectorIndex.build(img[a:b], offset=a, kind="flat"), VectorIndex.build(txt[a:b], offset=a,
                                                                                                kind="flat"))
              for a, b in ((0, 120), (120, 200))]
    q = img[[5, 150]]
    res = search(halves, q, q, "image", RetrievalConfig(mode="cross", n_results=3))
    assert list(res.ids[:, 0]) == [5, 150]  # each image's own caption, found in the text index
    np.testing.assert_allclose(res.fused, np.einsum("nd,nkd->nk", q, txt[res.ids]), atol=1e-5)


def test_a_mode_the_knowledge_base_cannot_support_fails_before_the_job_starts():
    from rag4dmc.pipeline.config import ConfigError, JobConfig
    from rag4dmc.pipeline.job.runner import preflight

    cfg = JobConfig.model_validate({"retrieval": {"mode": "cross"}, "selection": {"image_quality": "none"}})
    with pytest.raises(ConfigError, match="1280-d images and 384-d texts"):
        preflight(cfg, {"image_dim": 1280, "text_dim": 384})
    preflight(cfg, {"image_dim": 512, "text_dim": 512})  # a shared space: fine
