"""Knowledge-base indexes: approximate kinds rerank exactly, shards merge to the single-index answer."""

import numpy as np
import pytest

from pipeline.config import IndexConfig
from pipeline.index import VectorIndex, build_shards, choose_kind
from pipeline.knn import EmbeddingError, knn
from pipeline.retrieval import Neighbours, merge_candidates
from tests.planted import clustered

D = 32


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(50, D))
    base, _ = clustered(rng, centers, 20_000, 0.5)
    queries, _ = clustered(rng, centers, 300, 0.5)
    return base, queries


def test_auto_kind_is_exact_for_small_and_approximate_for_large_sets():
    cfg = IndexConfig(flat_max_rows=1000, pq_min_rows=10_000)
    assert choose_kind(1000, cfg) == "flat"
    assert choose_kind(1001, cfg) == "ivf"
    assert choose_kind(10_000, cfg) == "ivfpq"
    assert choose_kind(10, IndexConfig(kind="hnsw")) == "hnsw"


@pytest.mark.parametrize("kind", ["ivf", "ivfpq", "hnsw"])
def test_approximate_kinds_keep_recall_and_return_exact_scores(world, kind):
    base, queries = world
    cfg = IndexConfig(nlist=64, nprobe=16, pq_m=8, rerank_factor=8)
    index = VectorIndex.build(base, cfg, kind=kind)
    scores, ids = index.search(queries, 10)
    true_scores, true_ids = knn(queries, base, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, true_ids)])
    assert recall >= 0.9
    np.testing.assert_allclose(scores, np.einsum("nd,nkd->nk", queries, base[ids]), atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()


def test_shards_merge_to_the_single_index_answer(world):
    base, queries = world
    shards = build_shards(base, IndexConfig(shards=4, kind="flat"))
    assert [s.offset for s in shards] == [0, 5000, 10000, 15000]
    parts = [Neighbours(ids, scores, scores, scores) for scores, ids in (s.search(queries, 10) for s in shards)]
    merged = merge_candidates(parts, 10)
    s_scores, s_ids = merged.fused, merged.ids
    scores, ids = VectorIndex.build(base, IndexConfig(kind="flat")).search(queries, 10)
    np.testing.assert_array_equal(s_ids, ids)
    np.testing.assert_allclose(s_scores, scores, atol=1e-6)


def test_k_larger_than_the_index_pads_with_minus_one(world):
    base, queries = world
    scores, ids = VectorIndex.build(base[:3]).search(queries[:2], 5)
    assert (ids[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    assert set(ids[0, :3]) == {0, 1, 2}


def test_save_and_load_round_trip(world, tmp_path):
    base, queries = world
    index = VectorIndex.build(base, IndexConfig(nlist=32), kind="ivf", offset=7)
    index.save(tmp_path / "shard")
    loaded = VectorIndex.load(tmp_path / "shard")
    for a, b in zip(index.search(queries, 5), loaded.search(queries, 5)):
        np.testing.assert_array_equal(a, b)


def test_wrong_dimension_queries_are_refused(world):
    base, _ = world
    with pytest.raises(EmbeddingError, match="dims"):
        VectorIndex.build(base[:100]).search(np.ones((1, D + 1), np.float32), 1)
