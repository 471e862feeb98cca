"""The out-of-core KB build: bounded samples, streaming purification equal to the calibration's in-memory one, parallel index
population, images by reference, memory stated in advance, resume, and precomputed embeddings as input."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rag4dmc.actors.generators import Example, grounding_image
from rag4dmc.pipeline.config import (
    AlignConfig,
    BuildConfig,
    CalibrationConfig,
    FilterConfig,
    IndexConfig,
    KBConfig,
    MappingConfig,
)
from rag4dmc.pipeline.core.cluster_filter import kmeans_sample_size, sample_ids
from rag4dmc.pipeline.core.index import VectorIndex
from rag4dmc.pipeline.core.knn import knn, normalize_rows
from rag4dmc.pipeline.io import embedding_layout as layout
from rag4dmc.pipeline.io.kb_images import ExampleImages
from rag4dmc.pipeline.kb import build_fit, build_index, build_memory, build_purify, build_sides
from rag4dmc.pipeline.kb import store as kb_store
from rag4dmc.pipeline.kb.purification import align_external, filter_external
from tests.planted import clustered
from tests.processes import processes_with_env, sigkill_when, until

D = 32


def _png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def world():
    """Internal pairs in 4 clusters; external: the same clusters seen through a rotation, plus 2 far clusters the
    filter must drop. Image and text are two noisy views of one latent."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, D)) * 3
    latent_int, _ = clustered(rng, centres[:4], 1200, 0.4)
    latent_ext, labels = clustered(rng, centres, 4000, 0.4)
    rot = np.linalg.qr(rng.normal(size=(D, D)))[0].astype(np.float32)

    def views(z):
        return {"image": (z + 0.05 * rng.normal(size=z.shape)).astype(np.float32),
                "text": (z @ rot.T + 0.05 * rng.normal(size=z.shape)).astype(np.float32)}

    internal, external = views(latent_int), views(latent_ext)
    q, r = np.linalg.qr(np.eye(D) + 0.15 * rng.normal(size=(D, D)))
    tilt = (q * np.sign(np.diag(r))).astype(np.float32)  # a rotation near the identity
    external = {m: (v @ tilt).astype(np.float32) for m, v in external.items()}  # a slightly turned space
    return internal, external, labels


CFG = KBConfig(
    mapping=MappingConfig(max_epochs=5, hidden_dim=64),
    filter=FilterConfig(tau_cent=0.5, tau_inst=0.2, points_per_centroid=39, n_clusters_external=30),
    align=AlignConfig(max_rows=400, max_rounds=3),
    index=IndexConfig(flat_max_rows=100, nlist=16, nprobe=16, recall_queries=50),
    calibration=CalibrationConfig(enabled=False),
    build=BuildConfig(piece_rows=700),  # several pieces per shard: the streaming code paths run
)


def _write_side(root: str, vectors: dict[str, np.ndarray], shards: int, name: str) -> None:
    n = len(vectors["image"])
    bounds = np.linspace(0, n, shards + 1).astype(int)
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        meta = pa.table({"key": [f"{name}{j:06d}" for j in range(a, b)], "caption": [f"{name} {j}" for j in range(a, b)],
                         "url": [f"file:///nowhere/{name}/{j}.png" for j in range(a, b)]})
        layout.write_embedding_shard(root, f"{i:03d}", vectors["image"][a:b], vectors["text"][a:b], meta,
                                     dtype="float32")


def test_kmeans_trains_on_a_uniform_random_sample_within_faiss_bounds():
    assert kmeans_sample_size(1_000_000, 1000, 64) == 64_000
    assert kmeans_sample_size(5_000, 1000, 64) == 5_000  # all rows of a small set
    ids = sample_ids(1_000_000, 1000, seed=0)
    assert len(np.unique(ids)) == 1000 and ids.min() < 20_000 and ids.max() > 980_000  # not the first rows
    np.testing.assert_array_equal(ids, sample_ids(1_000_000, 1000, seed=0))
    for bad in (38, 257):
        with pytest.raises(ValueError):
            FilterConfig(points_per_centroid=bad)


def _purified_in_memory(internal: dict, external: dict, cfg) -> tuple[np.ndarray, dict, dict]:
    """The calibration's in-memory purification (``rag4dmc.pipeline.kb.purification``): keep, kept rows aligned, W."""
    ext = {m: normalize_rows(v, m) for m, v in external.items()}
    keep = filter_external(internal, ext, cfg)["keep"]
    aligned, results = align_external(internal, ext, keep, cfg)
    return keep, {m: aligned[m][keep] for m in aligned}, {m: results[m].W for m in results}


def test_streaming_purification_equals_the_calibrations_in_memory_one(world, tmp_path):
    """Same data, same samples: the build keeps the rows the calibration scored and W agrees within 1e-4."""
    internal, external, labels = world
    _write_side(f"{tmp_path}/int", internal, 2, "i")
    _write_side(f"{tmp_path}/ext", external, 3, "e")
    inside, outside = build_sides.open_side("internal", f"{tmp_path}/int", None), \
        build_sides.open_side("external", f"{tmp_path}/ext", None)

    fitted = build_fit.fit(inside, outside, CFG, None)
    counts = [build_purify.purify_shard({"side": "external", "shard": s, "out": str(tmp_path / "kb"),
                                     "storage_options": None, "fitted": fitted}) for s in outside.shards]
    parts = layout.list_embedding_shards(f"{tmp_path}/kb/{kb_store.PARTS_DIR}/external")
    streamed_ids = [i for p in parts for i in layout.read_metadata(p).column("id").to_pylist()]

    norm = {m: normalize_rows(v, m) for m, v in internal.items()}
    keep, aligned, rotations = _purified_in_memory(norm, external, CFG)
    assert streamed_ids == [f"e{j:06d}" for j in np.flatnonzero(keep)]
    assert 0 < keep.sum() < len(keep) and not keep[labels >= 4].any()  # the far clusters are dropped
    assert sum(c["kept"] for c in counts) == keep.sum()
    for m in ("image", "text"):
        np.testing.assert_allclose(fitted.rotations[m], rotations[m], atol=1e-4)
        kept_vectors = np.vstack([layout.read_vectors(p.image if m == "image" else p.text, 0, p.rows) for p in parts])
        np.testing.assert_allclose(kept_vectors, aligned[m], atol=2e-3)  # stored as float16
    assert fitted.filters["image"].sample_external == kmeans_sample_size(4000, 30, 39) < 4000


def test_a_mapping_sample_smaller_than_the_internal_pairs_is_what_the_filter_and_w_are_fitted_on(world, tmp_path):
    """More internal pairs than mapping.max_rows: the filter and W are fitted on the mapping's internal sample."""
    internal, external, _ = world
    cfg = CFG.model_copy(update={"mapping": CFG.mapping.model_copy(update={"max_rows": 500})})
    _write_side(f"{tmp_path}/int", internal, 2, "i")
    _write_side(f"{tmp_path}/ext", external, 3, "e")
    fitted = build_fit.fit(build_sides.open_side("internal", f"{tmp_path}/int", None),
                          build_sides.open_side("external", f"{tmp_path}/ext", None), cfg, None)
    assert fitted.report["internal_sample_rows"] == 500 < len(internal["image"])
    for s in build_sides.open_side("external", f"{tmp_path}/ext", None).shards:
        build_purify.purify_shard({"side": "external", "shard": s, "out": str(tmp_path / "kb"), "storage_options": None,
                               "fitted": fitted})
    parts = layout.list_embedding_shards(f"{tmp_path}/kb/{kb_store.PARTS_DIR}/external")
    streamed = [i for p in parts for i in layout.read_metadata(p).column("id").to_pylist()]

    rows = sample_ids(len(internal["image"]), 500, cfg.mapping.seed)
    keep, aligned, rotations = _purified_in_memory({m: normalize_rows(v[rows], m) for m, v in internal.items()},
                                                   external, cfg)
    assert streamed == [f"e{j:06d}" for j in np.flatnonzero(keep)]
    for m in ("image", "text"):
        np.testing.assert_allclose(fitted.rotations[m], rotations[m], atol=1e-4)
        streamed_vectors = np.vstack([layout.read_vectors(getattr(p, m), 0, p.rows) for p in parts])
        np.testing.assert_allclose(streamed_vectors, aligned[m], atol=2e-3)  # the parts are float16


def test_a_samples_texts_come_in_its_order_from_every_shard(tmp_path):
    """The calibration's BLEU reads the texts of sampled ids: in the sample's order, across shards."""
    v = normalize_rows(np.random.default_rng(3).normal(size=(90, D)).astype(np.float32), "v")
    _write_side(f"{tmp_path}/side", {"image": v, "text": v}, 3, "s")
    side = build_sides.open_side("external", f"{tmp_path}/side", None)
    ids = np.array([75, 2, 31, 89, 30, 0])
    texts, _ = build_fit.read_texts_and_images(side, ids, None, ExampleImages(cache_dir=tmp_path / "cache"))
    assert texts == [f"s {j}" for j in ids]


def test_a_purified_part_already_written_is_not_redone(world, tmp_path):
    internal, external, _ = world
    _write_side(f"{tmp_path}/ext", external, 1, "e")
    _write_side(f"{tmp_path}/int", internal, 1, "i")
    inside, outside = build_sides.open_side("internal", f"{tmp_path}/int", None), \
        build_sides.open_side("external", f"{tmp_path}/ext", None)
    fitted = build_fit.fit(inside, outside, CFG, None)
    item = {"side": "external", "shard": outside.shards[0], "out": str(tmp_path / "kb"), "storage_options": None,
            "fitted": fitted}
    first = build_purify.purify_shard(item)
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "kb").rglob("*") if p.is_file()}
    again = build_purify.purify_shard(item)
    assert again["resumed"] and again["kept"] == first["kept"]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "kb").rglob("*") if p.is_file()} == written


def test_index_shards_populated_in_parallel_answer_as_one_index(tmp_path):
    """Train once, populate two ranges of global ids as two shards: merged top-k equals one index's top-k."""
    rng = np.random.default_rng(1)
    base, _ = clustered(rng, rng.normal(size=(20, D)) * 3, 6000, 0.5)
    base = normalize_rows(base, "base")
    _write_side(f"{tmp_path}/parts", {"image": base, "text": base[::-1].copy()}, 3, "p")
    parts = build_sides.Side("kb", str(tmp_path), layout.list_embedding_shards(f"{tmp_path}/parts"))
    cfg = CFG.model_copy(update={"index": IndexConfig(nlist=32, nprobe=8, rerank_factor=10, recall_queries=50)})
    trained = build_index.train_indexes(parts, "ivfpq", cfg, None)
    queries = {m: base[:40] for m in ("image", "text")}
    common = {"kind": "ivfpq", "cfg": cfg, "out": str(tmp_path / "kb"), "storage_options": None}
    results = [build_index.build_index_shard({**common, "start": a, "stop": b, "shard": i, "path": f"shard-{i:05d}"},
                                          parts, trained, queries)
               for i, (a, b) in enumerate([(0, 3500), (3500, 6000)])]
    report = build_index.recall_report(results, np.arange(40), 0.9)
    build_index.save_search_params(str(tmp_path / "kb"), ["shard-00000", "shard-00001"], report, cfg, None)
    shards = [VectorIndex.load(tmp_path / "kb" / f"shard-{i:05d}" / "image") for i in range(2)]
    assert shards[0].vectors.dtype == np.float16 and shards[1].offset == 3500
    assert {(s.nprobe, s.rerank_factor) for s in shards} == {(report["nprobe"]["image"],
                                                              report["rerank_factor"]["image"])}
    answers = [s.search(base[:40], 10) for s in shards]
    merged = build_index.topk_merge(np.hstack([a[0] for a in answers]), np.hstack([a[1] for a in answers]), 10)[1]
    one = faiss.deserialize_index(trained["image"])  # the same trained empty index, filled with every row at once
    one.add(base.astype(np.float16).astype(np.float32))
    whole = VectorIndex(base.astype(np.float16), one, "ivfpq", report["rerank_factor"]["image"])
    whole.set_nprobe(report["nprobe"]["image"], cfg.index)
    np.testing.assert_array_equal(merged, whole.search(base[:40], 10)[1])  # side by side = one index, same top-k
    exact = knn(base[:40], base, 10)[1]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(merged, exact)]) >= 0.9
    assert report["image"] >= 0.9 and not report["below_min"]


def test_recall_below_min_at_every_search_setting_marks_the_report_and_warns_with_the_knobs(caplog):
    """A grid whose best (nprobe, depth) finds 6 of the 10 true neighbours: the best pair is kept, the report is
    marked below_min, and the warning names the largest pair tried and the settings to raise."""
    queries = np.arange(4)
    exact_ids = np.tile(np.arange(100, 111), (4, 1))  # 11: the query's own id is left out of neither
    scores = np.tile(np.linspace(1, 0, 11), (4, 1)).astype(np.float32)

    def found(hits: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``hits`` true neighbours, then rows that are not neighbours."""
        ids = np.hstack([exact_ids[:, :hits], np.tile(np.arange(900, 911 - hits), (4, 1))])
        return scores, ids

    grid = {(32, 20): found(3), (32, 40): found(4), (64, 20): found(5), (64, 40): found(6)}
    result = {m: {"exact": (scores, exact_ids), "approx": grid} for m in ("image", "text")}
    report = build_index.recall_report([result], queries, 0.9)
    assert report["image"] == report["text"] == 0.6 and report["below_min"]
    assert (report["nprobe"]["image"], report["rerank_factor"]["image"]) == (64, 40)  # the best pair is kept
    with caplog.at_level("WARNING", logger="rag4dmc.pipeline.kb.build_index"):
        assert build_index.warn_if_below_min(report)
    text = caplog.text
    assert "below index.min_recall 0.90" in text and "nprobe 64 and rerank_factor 40" in text
    assert all(knob in text for knob in ("index.max_nprobe", "index.max_rerank_factor", "index.bytes_per_row"))
    caplog.clear()
    report = build_index.recall_report([result], queries, 0.5)  # met at (64, 20): no warning
    assert not report["below_min"] and not build_index.warn_if_below_min(report) and not caplog.text


def _one_index_shard(tmp_path, base: np.ndarray, kind: str, index: IndexConfig) -> tuple[KBConfig, dict]:
    """``base`` as both modalities' parts, one index shard of it built with its first 60 rows as recall queries."""
    _write_side(f"{tmp_path}/parts", {"image": base, "text": base.copy()}, 2, "p")
    parts = build_sides.Side("kb", str(tmp_path), layout.list_embedding_shards(f"{tmp_path}/parts"))
    cfg = CFG.model_copy(update={"index": index})
    trained = build_index.train_indexes(parts, kind, cfg, None)
    queries = {m: base[:60] for m in ("image", "text")}
    task = {"start": 0, "stop": len(base), "shard": 0, "path": "shard-00000", "kind": kind, "cfg": cfg,
            "out": str(tmp_path / "kb"), "storage_options": None}
    return cfg, build_index.build_index_shard(task, parts, trained, queries)


def test_the_build_keeps_the_least_rerank_depth_that_reaches_min_recall(tmp_path):
    """Coarse PQ codes (4 bytes a row), every list probed: reranking 1 candidate per result misses neighbours;
    the build measures each depth, keeps the least one with recall@10 >= min_recall, and saves it with the
    shard's index."""
    rng = np.random.default_rng(4)
    base, _ = clustered(rng, rng.normal(size=(10, D)) * 2, 6000, 0.6)
    base = normalize_rows(base, "base")
    cfg, result = _one_index_shard(tmp_path, base, "ivfpq", IndexConfig(
        nlist=16, nprobe=16, pq_m=4, rerank_factor=1, max_rerank_factor=64, recall_queries=60))
    report = build_index.recall_report([result], np.arange(60), 0.9)
    by_factor = {e["rerank_factor"]: e["recall"] for e in report["by_search"]["image"]}
    chosen = report["rerank_factor"]["image"]
    assert sorted(by_factor) == [1, 2, 4, 8, 16, 32, 64] and report["nprobe"]["image"] == 16
    assert by_factor[1] < 0.9 <= by_factor[chosen] == report["image"]
    assert all(by_factor[f] < 0.9 for f in by_factor if f < chosen)  # the least depth that is enough
    build_index.save_search_params(str(tmp_path / "kb"), ["shard-00000"], report, cfg, None)
    assert VectorIndex.load(tmp_path / "kb" / "shard-00000" / "image").rerank_factor == chosen


def test_the_build_probes_as_many_lists_as_recall_needs_and_the_kb_searches_with_them(tmp_path):
    """Spread-out rows over 64 lists, exact codes: one probed list misses most true neighbours, and with exact
    scores there is no rerank depth to try. The build doubles nprobe from 1, keeps the least that reaches
    min_recall, and the saved index searches with it, its HNSW coarse quantiser searched 2 deep per list."""
    rng = np.random.default_rng(5)
    base = normalize_rows(rng.normal(size=(6000, D)).astype(np.float32), "base")
    cfg, result = _one_index_shard(tmp_path, base, "ivf", IndexConfig(
        nlist=64, hnsw_quantizer_min_lists=64, nprobe=1, max_nprobe=64, rerank_factor=1, max_rerank_factor=4,
        recall_queries=60, quantizer_ef_per_probe=2))
    report = build_index.recall_report([result], np.arange(60), 0.9)
    grid = {(e["nprobe"], e["rerank_factor"]): e["recall"] for e in report["by_search"]["image"]}
    assert sorted({p for p, _ in grid}) == [1, 2, 4, 8, 16, 32, 64]
    assert {f for _, f in grid} == {1}  # IVF-Flat's scores are exact: nothing to rerank, no depth measured
    assert grid[(1, 1)] < 0.5
    nprobe, factor = report["nprobe"]["image"], report["rerank_factor"]["image"]
    assert grid[(nprobe, factor)] >= 0.9 and nprobe > 1
    assert all(r < 0.9 for (p, _), r in grid.items() if p < nprobe)  # the least nprobe that is enough
    build_index.save_search_params(str(tmp_path / "kb"), ["shard-00000"], report, cfg, None)
    saved = VectorIndex.load(tmp_path / "kb" / "shard-00000" / "image")
    assert (saved.nprobe, saved.rerank_factor, saved.quantizer_ef) == (nprobe, factor, max(2 * nprobe, 16))
    exact = knn(base[60:120], base, 10)[1]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(saved.search(base[60:120], 10)[1], exact)]) >= 0.85


def test_an_index_shard_is_written_in_place_locally_and_uploaded_whole_to_object_storage(
        tmp_path, s3_server, s3_bucket):
    """A local KB's shard is written where it stays (a stale file of an interrupted build is gone); on S3 the
    same shard arrives file for file."""
    import s3fs

    rng = np.random.default_rng(2)
    base = normalize_rows(rng.normal(size=(1500, D)).astype(np.float32), "base")
    _write_side(f"{tmp_path}/parts", {"image": base, "text": base[::-1].copy()}, 2, "p")
    parts = build_sides.Side("kb", str(tmp_path), layout.list_embedding_shards(f"{tmp_path}/parts"))
    cfg = CFG.model_copy(update={"index": IndexConfig(nlist=8, nprobe=8, recall_queries=20)})
    trained = build_index.train_indexes(parts, "ivf", cfg, None)
    queries = {m: base[:20] for m in ("image", "text")}
    stale = tmp_path / "kb" / "shard-00000" / "image" / "left-by-a-killed-build.npy"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"x")
    task = {"start": 0, "stop": 1500, "shard": 0, "path": "shard-00000", "kind": "ivf", "cfg": cfg}
    local = build_index.build_index_shard({**task, "out": str(tmp_path / "kb"), "storage_options": None},
                                      parts, trained, queries)
    assert not stale.exists()
    remote = build_index.build_index_shard({**task, "out": f"{s3_bucket}/kb", "storage_options": s3_server.storage_options},
                                       parts, trained, queries)
    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    for m in ("image", "text"):
        assert local[m]["sha256"] == remote[m]["sha256"]
        files = sorted(p.name for p in (tmp_path / "kb" / "shard-00000" / m).iterdir())
        assert files == sorted(VectorIndex.files())
        for name in files:
            assert fs.cat_file(f"{s3_bucket}/kb/shard-00000/{m}/{name}") == \
                (tmp_path / "kb" / "shard-00000" / m / name).read_bytes()


def test_each_step_gets_the_cluster_cpus_shared_out_between_its_tasks():
    """A lone index shard takes a whole node, many shards take build.task_cpus each, never more than a node."""
    assert build_memory.spread_cpus(1, 1.0, node_cpus=8, cluster_cpus=32) == 8
    assert build_memory.spread_cpus(4, 1.0, node_cpus=8, cluster_cpus=16) == 4
    assert build_memory.spread_cpus(100, 1.0, node_cpus=8, cluster_cpus=16) == 1.0
    assert build_memory.spread_cpus(3, 0.5, node_cpus=2, cluster_cpus=2) == 0.5


def test_a_build_task_computes_on_every_cpu_it_reserved(ray_local):
    """A worker Ray reuses keeps the threads of the task it started for (one, for a 1-CPU task): a build task
    sets BLAS/torch/FAISS threads to the CPUs it reserved, whatever the worker held before."""
    def threads():
        import faiss
        import torch
        from threadpoolctl import threadpool_info, threadpool_limits

        torch.set_num_threads(1)  # a worker started for a 1-CPU task
        faiss.omp_set_num_threads(1)
        threadpool_limits(1)
        from rag4dmc.actors.resources import use_assigned_cpus

        n = use_assigned_cpus()
        return n, torch.get_num_threads(), faiss.omp_get_max_threads(), min(i["num_threads"] for i in threadpool_info())

    assert ray_local.get(ray_local.remote(num_cpus=2)(threads).remote()) == (2, 2, 2, 2)
    assert ray_local.get(ray_local.remote(num_cpus=0.5)(threads).remote()) == (1, 1, 1, 1)


def test_example_images_are_fetched_by_reference_and_a_broken_one_is_skipped(tmp_path):
    good, other = _png((255, 0, 0)), _png((0, 0, 255))
    (tmp_path / "good.png").write_bytes(good)
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    pq.write_table(pa.table({"id": ["a", "b", "c"], "image": [b"x", other, b"y"], "text": ["1", "2", "3"]}),
                   tmp_path / "shard.parquet", row_group_size=1)
    images = ExampleImages(cache_dir=tmp_path / "cache")
    assert images.get(str(tmp_path / "good.png")) == (good, None)
    assert images.get(None, str(tmp_path / "shard.parquet"), 1) == (other, None)  # its own row group only
    data, why = images.get(str(tmp_path / "missing.png"))
    assert data is None and "could not be fetched" in why and "missing.png" in why
    assert images.get(None, None, None)[1] == "the knowledge base has no image location for this entry"
    images.get(str(tmp_path / "good.png"))
    assert images.stats() == {"fetches": 3, "cache_hits": 1, "failures": 1}

    def example(i: str, uri: str | None) -> Example:
        return Example(id=i, text="", image=None, score=1.0, fetch=lambda: images.get(uri))

    ranked = [example("missing", str(tmp_path / "missing.png")), example("broken", str(tmp_path / "broken.png")),
              example("good", str(tmp_path / "good.png")), example("unused", str(tmp_path / "never.png"))]
    picture = grounding_image(ranked, 4)
    assert picture is not None and picture.getpixel((0, 0))[:3] == (255, 0, 0)
    assert "could not be fetched" in ranked[0].problem and "does not decode" in ranked[1].problem
    assert ranked[2].problem is None and ranked[3].fetch is not None  # the fourth was never fetched


def test_a_completed_row_names_the_examples_whose_image_could_not_be_had_and_uses_the_next(tmp_path):
    """t2i with the nearest-neighbour generator against a stored KB's entries (locations, no bytes): the
    first-ranked example's file is missing, the second's does not decode, the third is the image written; the
    row's ``skipped_examples`` provenance says which examples were skipped and why."""
    from rag4dmc.actors.complete import CompleteImages
    from rag4dmc.pipeline.config import EncoderConfig, GeneratorConfig, SelectionConfig

    good = _png((0, 255, 0))
    (tmp_path / "good.png").write_bytes(good)
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    entries = pa.table({"id": ["e-missing", "e-broken", "e-good"], "text": ["x", "y", "z"],
                        "image_uri": [str(tmp_path / n) for n in ("missing.png", "broken.png", "good.png")],
                        "image_shard": pa.nulls(3, pa.string()), "image_row": pa.nulls(3, pa.int64())})
    stage = CompleteImages(GeneratorConfig(), SelectionConfig(image_quality="none"), EncoderConfig(), entries)
    stage.setup()
    out = stage.process({"row_key": ["r0"], "text": ["a green square"], "ret_ids": [np.array([0, 1, 2])],
                         "ret_fused": [np.array([0.9, 0.8, 0.7], np.float32)],
                         "ret_cross": [np.array([0.9, 0.8, 0.7], np.float32)], "pseudo": [np.zeros(4, np.float32)]})
    cols = out.columns
    assert out.errors == [None] and cols["candidate_ids"][0] == ["e-good"]
    assert np.asarray(Image.open(io.BytesIO(cols["image"][0])).convert("RGB"))[0, 0].tolist() == [0, 255, 0]
    missing, broken = cols["skipped_examples"][0]
    assert missing.startswith("e-missing: ") and "could not be fetched" in missing
    assert broken.startswith("e-broken: ") and "does not decode" in broken


def test_the_memory_estimate_refuses_what_no_node_holds():
    cfg = KBConfig(build=BuildConfig(piece_rows=5_000_000))
    est = build_memory.estimate_memory(100_000, 1_000_000_000, (768, 768), cfg)
    assert est["sizes"]["shards"] == 101 and est["sizes"]["kind"] == "ivfpq"
    with pytest.raises(MemoryError, match="build.piece_rows"):
        build_memory.check_memory(est, node_bytes=16 * 2**30, driver_bytes=16 * 2**30)
    fine = build_memory.estimate_memory(100_000, 10_000_000, (512, 512), KBConfig())
    assert fine["driver"] < 2 * 2**30 and max(fine[k] for k in ("fit", "purify", "index")) < 6 * 2**30
    build_memory.check_memory(fine, node_bytes=16 * 2**30, driver_bytes=16 * 2**30)
    # The driver's share does not grow with the corpus.
    assert build_memory.estimate_memory(100_000, 10**9, (512, 512), KBConfig())["driver"] == fine["driver"]


@pytest.mark.timeout(900)
def test_precomputed_embeddings_build_the_same_kb_that_complete_uses(kb, tmp_path):
    """kb build from images (the session's job KB) writes the clip-retrieval layout; a second build from that layout
    (--internal-embeddings / --external-embeddings) gives the same KB, and the job completes against it; a rerun of
    the build from images embeds nothing again."""
    import shutil

    from rag4dmc.pipeline.demo.corpus import make_incomplete, write_split
    from rag4dmc.pipeline.io.storage import Storage
    from rag4dmc.pipeline.job.kb_runner import KBBuildSpec, run_kb_build
    from rag4dmc.pipeline.job.runner import JobSpec, read_output, run_job
    from tests.test_job import FAST_KB, kb_sources

    internal, external = kb_sources(kb)
    emb = f"{kb}/embeddings"
    assert layout.total_rows(layout.list_embedding_shards(f"{emb}/external")) == 150
    assert not [p for p in Path(kb).rglob("*") if p.suffix in (".png", ".jpg")]
    meta = pq.read_table(next((Path(emb) / "external" / "metadata").iterdir()))
    assert meta.column("image_shard")[0].as_py().endswith("external/part-00000.parquet")

    rerun = str(tmp_path / "kb-again")
    shutil.copytree(kb, rerun)  # the session's KB stays as it is
    again = run_kb_build(KBBuildSpec(internal=internal, external=external, out=rerun, cfg=FAST_KB))
    assert again["report"]["embedding"]["external"]["resumed_rows"] == 150  # nothing embedded twice
    second = run_kb_build(KBBuildSpec(internal=None, internal_embeddings=f"{emb}/internal",
                                      external_embeddings=f"{emb}/external", out=f"{tmp_path}/kb2", cfg=FAST_KB))
    assert second["rows"] == kb_store.load(kb, shards=[], with_entries=False).manifest["rows"]
    a = kb_store.load(kb).entries.to_pydict()
    b = kb_store.load(f"{tmp_path}/kb2").entries.to_pydict()
    assert a == b  # same entries, same order, same image locations

    write_split(make_incomplete(30, seed=3, missing_rate=0.8).select(["id", "image", "text"]), f"{tmp_path}/data")
    summary = run_job(JobSpec(data=f"{tmp_path}/data", kb=f"{tmp_path}/kb2", out=f"{tmp_path}/out"))
    out = read_output(Storage(), f"{tmp_path}/out").to_pandas()
    assert len(out) == 30 == summary["rows_out"] and out.row_key.is_unique
    assert summary["failed"] == 0
    manifest = json.loads((tmp_path / "kb2" / "manifest.json").read_text())
    assert manifest["format"] == kb_store.FORMAT_VERSION == 4


def test_http_image_urls_get_no_object_storage_options():
    """LAION's metadata holds http(s) urls: s3fs's options (anon, key, endpoint) must not reach aiohttp."""
    from rag4dmc.pipeline.io.storage import url_to_fs

    fs, _ = url_to_fs("https://example.com/a.png", {"anon": False, "key": "k", "client_kwargs": {}})
    assert not {"anon", "key", "client_kwargs"} & set(fs.storage_options)
    s3, _ = url_to_fs("s3://bucket/a.png", {"anon": True})
    assert s3.storage_options["anon"] is True


def test_a_resumed_build_reuses_its_fit_and_clears_the_parts_of_other_settings(world, tmp_path):
    internal, external, _ = world
    _write_side(f"{tmp_path}/int", internal, 1, "i")
    _write_side(f"{tmp_path}/ext", external, 2, "e")
    inside, outside = build_sides.open_side("internal", f"{tmp_path}/int", None), \
        build_sides.open_side("external", f"{tmp_path}/ext", None)
    out = str(tmp_path / "kb")
    key = build_fit.fingerprint(inside, outside, CFG)
    fitted = build_fit.fit(inside, outside, CFG, None)
    build_fit.save_fit(out, key, fitted, None)
    build_purify.purify_shard({"side": "external", "shard": outside.shards[0], "out": out, "storage_options": None,
                           "fitted": fitted})
    again = build_fit.resumed_fit(out, key, None)
    np.testing.assert_array_equal(again.rotations["image"], fitted.rotations["image"])  # the same W, not refitted
    assert (tmp_path / "kb" / kb_store.PARTS_DIR / "external").exists()
    assert build_fit.fingerprint(inside, outside, CFG.model_copy(update={"build": BuildConfig(piece_rows=5)})) == key
    other = build_fit.fingerprint(inside, outside, CFG.model_copy(
        update={"filter": CFG.filter.model_copy(update={"tau_cent": 0.6})}))
    assert other != key
    assert build_fit.resumed_fit(out, other, None) is None  # other settings: the old parts are not mixed in
    assert not (tmp_path / "kb" / kb_store.PARTS_DIR).exists()


@pytest.mark.timeout(900)
def test_a_killed_kb_build_resumes_without_redoing_the_parts_it_had_written(world, tmp_path, ray_local):
    """`rag4dmc kb build --internal-embeddings --external-embeddings` killed (SIGKILL, its whole process group, with
    its own Ray) once its first purified parts are written: the same build run again (on the session's cluster: the
    rerun needs no process of its own) reuses the fit, skips every part whose counts file was written (their files
    untouched) and finishes the KB."""
    import contextlib
    import os
    import signal
    import sys

    import yaml

    from rag4dmc.pipeline.job.kb_runner import KBBuildSpec, run_kb_build

    internal, external, _ = world
    lift = np.linalg.qr(np.random.default_rng(7).normal(size=(512, D)))[0].T.astype(np.float32)  # D -> 512, isometric
    _write_side(f"{tmp_path}/int", {m: v @ lift for m, v in internal.items()}, 1, "i")
    _write_side(f"{tmp_path}/ext", {m: v @ lift for m, v in external.items()}, 16, "e")
    config = {**CFG.model_dump(mode="json"), "encoder": {"backend": "open_clip", "model_name": "ViT-B-32"}}
    (tmp_path / "kb.yaml").write_text(yaml.safe_dump(config))
    kb = tmp_path / "kb"
    cmd = [sys.executable, "-m", "rag4dmc.pipeline.cli", "kb", "build", "--internal-embeddings", f"{tmp_path}/int",
           "--external-embeddings", f"{tmp_path}/ext", "--out", str(kb), "--config", str(tmp_path / "kb.yaml")]
    repo = str(Path(__file__).resolve().parents[1])
    marker = ("RAG4DMC_TEST_KILLED_BUILD", str(tmp_path))  # in every process the killed build starts
    env = {**os.environ, "PYTHONPATH": repo, "RAY_DATA_DISABLE_PROGRESS_BARS": "1", marker[0]: marker[1]}
    counts = kb / kb_store.PARTS_DIR
    sigkill_when(cmd, lambda: any(counts.glob("external/counts/*.json")), "a purified part was written", cwd=repo,
                 env=env, timeout_s=600, interval_s=0.05)
    # Ray's workers run in process groups of their own: one still finishing a part when its driver was killed may
    # write that part's counts file after the kill. What the killed build left is read once all of it has stopped.
    for pid in processes_with_env(*marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    until(lambda: not processes_with_env(*marker), 60, "the killed build's processes to end")
    assert not (kb / "manifest.json").exists()  # killed: not a KB yet
    done = {(p.parent.parent.name, p.stem.rsplit("_", 1)[1]) for p in counts.glob("*/counts/*.json")}
    assert any(side == "external" for side, _ in done)

    run_kb_build(KBBuildSpec(internal=None, internal_embeddings=f"{tmp_path}/int",
                             external_embeddings=f"{tmp_path}/ext", out=str(kb), cfg=KBConfig.model_validate(config)))
    report = json.loads((kb / "report.json").read_text())
    assert report["fit_resumed"]  # the same W: the parts already written stay valid
    assert report["resumed_parts"] == len(done)  # exactly the parts with a counts file were skipped, no more
    assert len(kb_store.load(str(kb)).entries) == report["kb_rows"] > 0
    assert not (kb / kb_store.PARTS_DIR).exists()  # the intermediates are gone once the KB is complete


def test_a_tasks_anonymous_peak_counts_the_memory_it_held_and_not_the_files_it_mapped(tmp_path):
    """The index task reads its float16 vectors back memory-mapped: their page cache counts in peak RSS but is
    not memory the task holds. The sampled peak of RssAnon sees a 256 MiB array that was freed, and not a
    256 MiB file read through a map."""
    mib = 2**20
    path = tmp_path / "vectors.npy"
    np.save(path, np.ones(256 * mib // 2, np.float16))
    with build_memory.PeakAnon(interval=0.01) as mapped:
        start = build_memory.anon_bytes()
        assert float(np.load(path, mmap_mode="r").sum(dtype=np.float64)) == 128 * mib  # every page read
    assert mapped.peak - start < 64 * mib
    with build_memory.PeakAnon(interval=0.01) as held:
        start = build_memory.anon_bytes()
        block = np.ones(256 * mib, np.uint8)
        time.sleep(0.2)  # held a while (the sampler runs when this thread lets go of the GIL)
        del block
    assert held.peak - start >= 200 * mib


def _small_fit(rng: np.random.Generator) -> build_fit.Fitted:
    from rag4dmc.pipeline.core.cluster_filter import FilterModel
    from rag4dmc.pipeline.core.mapping import CrossModalMapper

    filters = {m: FilterModel(rng.normal(size=(4, 6)).astype(np.float32), rng.normal(size=(5, 6)).astype(np.float32),
                              rng.uniform(size=5).astype(np.float32), rng.integers(0, 4, 5), 40, 50)
               for m in ("image", "text")}
    w = np.linalg.qr(rng.normal(size=(6, 6)))[0].astype(np.float32)
    cfg = KBConfig(filter=KBConfig().filter.model_copy(update={"tau_cent": 0.7}))  # as a calibration chose it
    return build_fit.Fitted(CrossModalMapper(8, 6, hidden_dim=16), filters, {"image": w, "text": None}, cfg,
                            {"fit_seconds": np.float64(1.5), "mapping": {"epochs": 3}}, {"chosen": {"alpha": 0.25}},
                            1234)


def test_an_interrupted_builds_fit_is_saved_as_arrays_and_json_and_read_back_whole(tmp_path):
    fitted = _small_fit(np.random.default_rng(0))
    build_fit.save_fit(str(tmp_path), "key-1", fitted, None)
    parts = tmp_path / kb_store.PARTS_DIR
    assert sorted(p.name for p in parts.iterdir()) == sorted([build_fit.FIT_ARRAYS, build_fit.FIT_META])
    again = build_fit.resumed_fit(str(tmp_path), "key-1", None)
    assert again.cfg == fitted.cfg and again.calibration == fitted.calibration and again.peak_rss == 1234
    assert again.report == {"fit_seconds": 1.5, "mapping": {"epochs": 3}}
    for name, value in fitted.mapping.arrays().items():
        np.testing.assert_array_equal(again.mapping.arrays()[name], value)
    for m in ("image", "text"):
        for field in build_fit.FILTER_ARRAYS:
            np.testing.assert_array_equal(getattr(again.filters[m], field), getattr(fitted.filters[m], field))
        assert again.filters[m].sample_external == 50
    np.testing.assert_array_equal(again.rotations["image"], fitted.rotations["image"])
    assert again.rotations["text"] is None
    z = np.random.default_rng(1).normal(size=(3, 8)).astype(np.float32)
    np.testing.assert_array_equal(again.mapping.image_to_text(z), fitted.mapping.image_to_text(z))
    assert build_fit.resumed_fit(str(tmp_path), "other-inputs", None) is None and not parts.exists()


def test_a_pickled_fit_in_a_kb_folder_is_refused_and_never_unpickled(tmp_path):
    """An older rag4dmc saved the fit with pickle; a KB folder on a shared bucket could hold one made to run code.
    The planted pickle would create a marker file when loaded: the build refuses it, saying what to do, and no
    marker appears."""
    import pickle

    class Payload:
        def __init__(self, marker: Path):
            self.marker = marker

        def __reduce__(self):
            return (Path.touch, (self.marker,))

    pickle.loads(pickle.dumps(Payload(tmp_path / "live")))
    assert (tmp_path / "live").exists()  # the payload works: loading the planted file would leave its marker
    marker = tmp_path / "unpickled"
    parts = tmp_path / "kb" / kb_store.PARTS_DIR
    parts.mkdir(parents=True)
    (parts / build_fit.PICKLED_FIT).write_bytes(pickle.dumps(Payload(marker)))
    (parts / build_fit.FIT_META).write_text(json.dumps({"fingerprint": "key-1"}))
    with pytest.raises(build_fit.UnsafeFitFile, match=r"fitted\.pkl .*not loaded.*Remove .*parts and run kb build"):
        build_fit.resumed_fit(str(tmp_path / "kb"), "key-1", None)
    assert not marker.exists()
    assert (parts / build_fit.PICKLED_FIT).exists()  # nothing removed behind the user's back
