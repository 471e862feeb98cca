"""Knowledge-base indexes: approximate kinds rerank exactly, shards merge to the single-index answer."""

import faiss
import numpy as np
import pytest

from rag4dmc.pipeline.config import IndexConfig
from rag4dmc.pipeline.core.index import (
    VectorIndex,
    build_shards,
    choose_kind,
    code_bytes,
    factory_string,
    nprobes,
    pick_search,
    pq_subquantizers,
    recall_at_k,
    search_grid,
    train_empty,
    train_rows,
)
from rag4dmc.pipeline.core.knn import EmbeddingError, knn
from rag4dmc.pipeline.core.retrieval import Neighbours, merge_candidates
from tests.conftest import off_main_thread
from tests.planted import clustered

D = 32


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(50, D))
    base, _ = clustered(rng, centers, 20_000, 0.5)
    queries, _ = clustered(rng, centers, 300, 0.5)
    return base, queries


def test_auto_kind_is_exact_for_small_sets_and_follows_the_byte_budget_above():
    cfg = IndexConfig(flat_max_rows=1000, bytes_per_row=64)
    assert choose_kind(1000, cfg, 512) == "flat"
    assert choose_kind(1001, cfg, 512) == "ivfpq"  # a float32 512-d vector (2 kB) is over 64 bytes
    assert choose_kind(1001, cfg, 8) == "ivf"  # 32 bytes fit: IVF-Flat
    assert choose_kind(10, IndexConfig(kind="hnsw")) == "hnsw"


def test_pq_codes_use_the_largest_divisor_of_the_dimension_within_the_budget():
    assert pq_subquantizers(512, IndexConfig(bytes_per_row=64)) == 64
    assert pq_subquantizers(768, IndexConfig(bytes_per_row=100)) == 96
    assert code_bytes("ivfpq", 768, IndexConfig(bytes_per_row=100)) == 96 + 8
    assert factory_string(100_000, 512, "ivfpq", IndexConfig(bytes_per_row=64)) == "IVF632,PQ64np"
    assert "HNSW" in factory_string(10_000_000, 512, "ivfpq", IndexConfig())  # 6,324 lists: graph quantiser
    with pytest.raises(EmbeddingError, match="divide"):
        pq_subquantizers(512, IndexConfig(pq_m=48))


def test_an_index_trained_once_and_filled_in_pieces_equals_one_index_built_whole(world):
    """autofaiss/FAISS's recipe: train an empty index, add rows in ranges (here three), same answers."""
    base, queries = world
    cfg = IndexConfig(nlist=64, nprobe=16, pq_m=8)
    rows = np.sort(np.random.default_rng(0).choice(len(base), train_rows(len(base), "ivfpq", cfg), replace=False))
    whole = train_empty(base[rows], len(base), "ivfpq", cfg)
    pieces = faiss.deserialize_index(faiss.serialize_index(whole))  # the broadcast empty index
    whole.add(base)
    for a, b in ((0, 7000), (7000, 13000), (13000, len(base))):
        pieces.add(base[a:b])
    for x, y in zip(whole.search(queries, 10), pieces.search(queries, 10)):
        np.testing.assert_array_equal(x, y)


def test_the_search_pair_is_the_least_nprobe_that_reaches_min_recall_then_the_least_rerank_depth_there():
    recall = {(32, 20): 0.65, (32, 160): 0.69, (64, 20): 0.80, (64, 160): 0.91, (128, 20): 0.89, (128, 40): 0.95,
              (256, 20): 0.90}
    assert pick_search(recall, 0.9) == (64, 160)  # probing finds the neighbours; reranking orders them
    assert pick_search(recall, 0.93) == (128, 40)
    assert pick_search(recall, 0.99) == (128, 40)  # none is enough: the highest recall
    assert pick_search({(0, 1): 1.0}, 0.9) == (0, 1)  # exact search: nothing to choose
    assert nprobes("ivfpq", IndexConfig(nprobe=32, max_nprobe=256), nlist=6196) == [32, 64, 128, 256]
    assert nprobes("ivf", IndexConfig(nprobe=32, max_nprobe=256), nlist=100) == [32, 64, 100]  # up to every list
    assert nprobes("ivf", IndexConfig(nprobe=32, max_nprobe=100), nlist=6196) == [32, 64, 100]
    with pytest.raises(ValueError, match="max_nprobe"):
        IndexConfig(nprobe=64, max_nprobe=32)
    assert nprobes("flat", IndexConfig(), nlist=1) == [0]
    grid_cfg = IndexConfig(nprobe=8, max_nprobe=16, rerank_factor=10, max_rerank_factor=20)
    assert search_grid("ivfpq", grid_cfg, 64) == [(8, 10), (8, 20), (16, 10), (16, 20)]
    assert search_grid("ivf", grid_cfg, 64) == [(8, 10), (16, 10)]  # exact scores: nothing to rerank


def test_an_hnsw_coarse_quantiser_is_searched_deeper_than_the_lists_probed(tmp_path, world):
    base, _ = world
    cfg = IndexConfig(kind="ivf", nlist=64, hnsw_quantizer_min_lists=64, nprobe=8, quantizer_ef_per_probe=3)
    index = VectorIndex.build(base, cfg)
    assert (index.nprobe, index.quantizer_ef) == (8, 24)
    index.set_nprobe(40, cfg)
    assert (index.nprobe, index.quantizer_ef) == (40, 120)
    index.save(tmp_path / "ix")
    loaded = VectorIndex.load(tmp_path / "ix")
    assert (loaded.nprobe, loaded.quantizer_ef) == (40, 120)
    assert VectorIndex.build(base, IndexConfig(kind="flat")).nprobe == 0


def test_the_saved_nprobe_reaches_an_ivf_index_under_opq_and_older_metadata_keeps_the_files_own(tmp_path, world):
    import json

    base, _ = world
    cfg = IndexConfig(kind="ivfpq", nlist=64, nprobe=4, pq_m=8, opq=True)
    index = VectorIndex.build(base, cfg)
    index.set_nprobe(16, cfg)
    index.save(tmp_path / "opq")
    assert VectorIndex.load(tmp_path / "opq").nprobe == 16
    meta = json.loads((tmp_path / "opq" / "meta.json").read_text())
    index.set_nprobe(8, cfg)
    index.save_index(tmp_path / "opq")  # the FAISS file now searches 8 lists
    (tmp_path / "opq" / "meta.json").write_text(json.dumps({k: meta[k] for k in ("kind", "rerank_factor", "offset")}))
    assert VectorIndex.load(tmp_path / "opq").nprobe == 8  # a KB built before nprobe was saved
    assert VectorIndex.load(tmp_path / "opq", with_index=False).nprobe == 0


def test_recall_counts_the_shared_neighbours_and_ignores_padding():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    approx = np.array([[4, 3, 9, -1], [5, 6, 7, 8]])
    assert recall_at_k(approx, exact, 4) == pytest.approx((2 / 4 + 1) / 2)


def test_float16_vectors_rerank_to_the_float32_ranking(world):
    base, queries = world
    exact = VectorIndex.build(base, IndexConfig(kind="flat"))
    half = VectorIndex(exact.vectors.astype(np.float16), exact.index, "ivf", 1)
    s32, i32 = exact.search(queries, 10)
    s16, _ = VectorIndex(exact.vectors.astype(np.float16), exact.index, "flat", 1).search(queries, 10)
    np.testing.assert_allclose(s16, s32, atol=2e-3)
    assert half.gather(np.array([[0, 1]])).dtype == np.float32


@pytest.mark.parametrize("stored", [np.float16, np.float32])
def test_gather_returns_the_stored_rows_as_float32_in_the_ids_shape(world, stored):
    """Any shape of ids, repeated and out of order, into a fresh array or a given one: the stored values exactly
    (float16 -> float32 is exact), so the rerank's fast conversion changes no score."""
    base, _ = world
    vectors = base.astype(stored)
    index = VectorIndex(vectors, None, "ivfpq", 1)
    ids = np.array([[5, 0, 5], [len(base) - 1, 2, 1]])
    got = index.gather(ids)
    assert got.dtype == np.float32 and got.shape == (2, 3, base.shape[1])
    np.testing.assert_array_equal(got, vectors[ids].astype(np.float32))
    out = np.full((2, 3, base.shape[1]), np.nan, np.float32)
    assert index.gather(ids, out) is out
    np.testing.assert_array_equal(out, got)
    with pytest.raises(ValueError, match="contiguous"):
        index.gather(ids, np.empty((3, 2, base.shape[1]), np.float32).transpose(1, 0, 2))


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


def test_the_exact_rerank_split_over_threads_returns_what_one_thread_returns(world, ast_builds):
    """IVF-PQ's rerank runs on as many threads as FAISS has; the pieces are reassembled in query order. Its
    threads build no Python AST (CPython gh-106905: tests/test_threads.py)."""
    base, queries = world
    vi = VectorIndex.build(base.astype(np.float16), IndexConfig(nlist=64, nprobe=16, pq_m=8), kind="ivfpq")
    before = faiss.omp_get_max_threads()
    try:
        answers = []
        for threads in (1, 3):
            faiss.omp_set_num_threads(threads)
            answers.append(vi.search(queries[:7], 10, block_size=5))  # blocks of 5 and 2 queries, split in 3 / 2
    finally:
        faiss.omp_set_num_threads(before)
    assert off_main_thread(ast_builds) == []
    for one, many in zip(*answers):
        np.testing.assert_array_equal(one, many)
    exact = knn(queries[:7], base, 10)[1]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(answers[1][1], exact)]) >= 0.9  # in query order
