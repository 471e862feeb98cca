"""The knowledge base: purification on planted data, sharded retrieval, persistence."""

import numpy as np
import pyarrow as pa
import pytest
from scipy.linalg import expm

from rag4dmc.pipeline.config import (
    AlignConfig,
    CalibrationConfig,
    FilterConfig,
    IndexConfig,
    KBConfig,
    MappingConfig,
    RetrievalConfig,
)
from rag4dmc.pipeline.core.retrieval import retrieve, searched_modality, shard_candidates
from rag4dmc.pipeline.kb import store as kb_store
from rag4dmc.pipeline.kb.in_memory import build_knowledge_base
from rag4dmc.pipeline.kb.knowledge_base import KnowledgeBase
from rag4dmc.pipeline.kb.purification import build_shards
from tests.planted import unit

D_IMG, D_TXT = 24, 16
FAST = KBConfig(
    mapping=MappingConfig(hidden_dim=64, max_epochs=40, lr=3e-3),
    filter=FilterConfig(tau_cent=0.5, tau_inst=0.2),
    align=AlignConfig(max_rounds=5),
    calibration=CalibrationConfig(enabled=False),  # these tests check purification at the given thresholds
)


def _world(seed=0, n_int=800, n_ext=600, n_off=200):
    rng = np.random.default_rng(seed)
    ci, ct = rng.normal(size=(30, D_IMG)) * 2, rng.normal(size=(30, D_TXT)) * 2

    def pairs(n, centers_i, centers_t):
        lab = rng.integers(0, len(centers_i), n)
        return unit(centers_i[lab] + 0.5 * rng.normal(size=(n, D_IMG))), unit(
            centers_t[lab] + 0.5 * rng.normal(size=(n, D_TXT)))

    ii, it = pairs(n_int, ci, ct)
    ei, et = pairs(n_ext, ci, ct)
    oi, ot = pairs(n_off, rng.normal(size=(5, D_IMG)) * 2, rng.normal(size=(5, D_TXT)) * 2)
    ext = {"image": np.vstack([ei, oi]), "text": np.vstack([et, ot])}

    def table(n, prefix):
        return pa.table({"id": [f"{prefix}{i}" for i in range(n)], "text": [f"caption {prefix}{i}" for i in range(n)],
                         "image": [b"img"] * n})

    return table(n_int, "int"), {"image": ii, "text": it}, table(n_ext + n_off, "ext"), ext


@pytest.fixture(scope="module")
def built():
    it, iemb, et, eemb = _world()
    return build_knowledge_base(it, iemb, et, eemb, FAST, encoder_info={"name": "planted"})


def test_build_drops_planted_off_domain_rows_and_reports_every_step(built):
    ids = built.entries.column("id").to_pylist()
    external = [i for i in ids if i.startswith("ext")]
    off_kept = sum(int(i[3:]) >= 600 for i in external)
    assert off_kept <= 10 and len(external) >= 0.9 * 600
    rep = built.report
    assert rep["filter"]["kept_pairs"] + rep["filter"]["dropped_pairs"] == 800
    for m in ("image", "text"):
        assert rep["align"][m]["rounds"] and rep["filter"][m]["clusters_dropped"] > 0
    assert rep["mapping"]["epochs"] > 0 and len(built) == 800 + len(external)
    assert built.manifest["image_dim"] == D_IMG and built.manifest["text_dim"] == D_TXT


def test_alignment_undoes_a_small_rotation_of_the_external_corpus():
    it, iemb, et, eemb = _world(seed=1, n_off=0)
    skew = np.random.default_rng(4).normal(size=(D_IMG, D_IMG)) * 0.05
    R = expm(skew - skew.T).astype(np.float32)  # a domain shift that is a small rotation
    rotated = dict(eemb, image=eemb["image"] @ R.T)
    kb = build_knowledge_base(it, iemb, et, rotated, FAST.model_copy(
        update={"filter": FilterConfig(tau_cent=-1, tau_inst=-1)}))  # keep all: test alignment alone
    ext = kb.shards[0].image.vectors[800:]
    before = np.einsum("nd,nd->n", rotated["image"], eemb["image"]).mean()
    after = np.einsum("nd,nd->n", ext, eemb["image"]).mean()
    assert after > 0.97 and after > before + 0.5 * (1 - before)


def test_sharded_retrieval_equals_single_index_fusion_retrieval(built):
    vectors = {m: np.vstack([s.index(m).vectors for s in built.shards]) for m in ("image", "text")}
    shards = build_shards(vectors, FAST.model_copy(update={"index": IndexConfig(shards=3)}))
    sharded = KnowledgeBase(built.entries, built.mapping, shards, built.report, built.manifest)
    assert [s.start for s in shards] == [0, len(built) // 3, 2 * len(built) // 3]
    q = vectors["image"][:50] + 0.05
    cfg = RetrievalConfig(top_k=10, n_results=4, alpha=0.6)
    a = sharded.retrieve(q, "image", cfg)
    b = built.retrieve(q, "image", cfg)
    np.testing.assert_array_equal(a.ids, b.ids)
    c = retrieve(q, built.pseudo(q, "image"), vectors["image"], vectors["text"], cfg)
    np.testing.assert_array_equal(b.ids, c.ids)
    np.testing.assert_allclose(b.fused, c.fused, atol=1e-5)


def test_text_queries_retrieve_symmetrically(built):
    q = built.shards[0].text.vectors[:20]
    res = built.retrieve(q, "text", RetrievalConfig(top_k=5, n_results=2, alpha=1.0))
    np.testing.assert_array_equal(res.ids[:, 0], np.arange(20))


def test_save_and_load_round_trip(built, tmp_path):
    version = kb_store.save(built, str(tmp_path / "kb"))
    loaded = kb_store.load(str(tmp_path / "kb"))
    assert loaded.version == version == built.version
    # Stored by reference: every column but the in-memory image bytes, which a KB folder never holds.
    assert loaded.entries.equals(kb_store.entries_by_reference(built.entries))
    assert "image" not in loaded.entries.column_names
    assert not list((tmp_path / "kb").rglob("*.png")) and built.entries.column("image").null_count == 0
    q = built.shards[0].image.vectors[:10]
    np.testing.assert_array_equal(loaded.retrieve(q, "image").ids, built.retrieve(q, "image").ids)
    only = kb_store.load(str(tmp_path / "kb"), shards=[0], with_entries=False)
    assert len(only.shards) == 1


def test_loading_a_missing_kb_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="rag4dmc kb build"):
        kb_store.load(str(tmp_path / "nothing"))


def test_kb_without_external_corpus_is_internal_only():
    it, iemb, _, _ = _world()
    kb = build_knowledge_base(it, iemb, None, None, FAST)
    assert len(kb) == 800 and "filter" not in kb.report


def test_entries_are_memory_mapped_not_copied(tmp_path):
    """A KB's entries can be far larger than an actor's memory: opening them reads nothing."""
    rng = np.random.default_rng(0)
    n, size = 2000, 50_000
    images = [rng.bytes(size) for _ in range(n)]
    table = pa.table({"id": [f"e{i}" for i in range(n)], "source": ["internal"] * n,
                      "text": [f"t{i}" for i in range(n)], "image": pa.array(images, pa.binary())})
    kb_store.write_entries(table, tmp_path / kb_store.ENTRIES_FILE)
    del table
    before = pa.total_allocated_bytes()
    entries = kb_store.open_entries(tmp_path / kb_store.ENTRIES_FILE)
    assert entries.num_rows == n
    assert pa.total_allocated_bytes() - before < size * 10  # not the 100 MB of image bytes
    picked = kb_store.take_entries(entries, np.array([1999, 0, 7, 7]))
    assert picked["id"] == ["e1999", "e0", "e7", "e7"]
    assert picked["image"][0] == images[1999] and picked["image"][2] == images[7]


def test_a_retrieval_actor_loads_only_the_index_it_searches(built, tmp_path):
    kb_store.save(built, str(tmp_path / "kb"))
    full = kb_store.load(str(tmp_path / "kb"), with_entries=False)
    only_image = kb_store.load(str(tmp_path / "kb"), with_entries=False, searched="image")
    assert all(s.text.index is None and s.image.index is not None for s in only_image.shards)
    q = built.shards[0].image.vectors[:10]
    want, got = full.retrieve(q, "image"), only_image.retrieve(q, "image")  # the text vectors still fuse
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_allclose(got.fused, want.fused, atol=1e-6)
    with pytest.raises(RuntimeError, match="with_index=False"):
        only_image.retrieve(built.shards[0].text.vectors[:2], "text")
    assert searched_modality("image", RetrievalConfig(mode="mapped")) == "text"
    assert searched_modality("image", RetrievalConfig(mode="cross")) == "text"
    assert searched_modality("image", RetrievalConfig()) == "image"


def test_a_kb_of_another_format_asks_for_a_rebuild(built, tmp_path):
    import json

    kb_store.save(built, str(tmp_path / "kb"))
    manifest = json.loads((tmp_path / "kb" / "manifest.json").read_text())
    (tmp_path / "kb" / "manifest.json").write_text(json.dumps({**manifest, "format": 1}))
    with pytest.raises(ValueError, match="rebuild it with `rag4dmc kb build`"):
        kb_store.load(str(tmp_path / "kb"))


def test_an_actor_downloads_only_its_part_of_a_remote_kb(built, s3_server, s3_bucket, tmp_path, monkeypatch):
    """At LAION scale no node holds the whole KB: a retrieval actor fetches its shard group's files and
    the index it searches, a completion actor the entries file."""
    vectors = {m: np.vstack([s.index(m).vectors for s in built.shards]) for m in ("image", "text")}
    shards = build_shards(vectors, FAST.model_copy(update={"index": IndexConfig(shards=3)}))
    manifest = {**built.manifest, "shards": [{"start": s.start, "stop": s.stop, "path": f"shard-{i:05d}"}
                                             for i, s in enumerate(shards)]}
    kb = KnowledgeBase(built.entries, built.mapping, shards, built.report, manifest)
    uri, opts = f"{s3_bucket}/kb", s3_server.storage_options
    kb_store.save(kb, uri, opts)
    monkeypatch.setattr(kb_store.tempfile, "gettempdir", lambda: str(tmp_path))
    cache = tmp_path / "rag4dmc-kb-cache" / kb.version

    part = kb_store.load(uri, opts, shards=[1], with_entries=False, searched="text")
    files = {p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file()}
    assert files == {"manifest.json", "mapping.safetensors", "report.json", "shard-00001/image/meta.json",
                     "shard-00001/image/vectors.npy", "shard-00001/text/meta.json",
                     "shard-00001/text/vectors.npy", "shard-00001/text/index.faiss"}
    q = shards[1].text.vectors[:5]
    got = shard_candidates(part.shards[0], q, part.pseudo(q, "text"), "text", RetrievalConfig())
    want = shard_candidates(shards[1], q, kb.pseudo(q, "text"), "text", RetrievalConfig())
    np.testing.assert_array_equal(got.ids, want.ids)

    entries = kb_store.load_entries(uri, opts)
    assert (cache / kb_store.ENTRIES_FILE).is_file() and not (cache / "shard-00000").exists()
    assert entries.equals(kb_store.entries_by_reference(built.entries))
