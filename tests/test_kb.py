"""The knowledge base: purification on planted data, sharded retrieval, persistence."""

import json
import shutil
import uuid
from collections.abc import Iterator

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
from rag4dmc.pipeline.io.storage import Storage
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
                         "image": [f"image of {prefix}{i}".encode() for i in range(n)]})

    return table(n_int, "int"), {"image": ii, "text": it}, table(n_ext + n_off, "ext"), ext


@pytest.fixture(scope="module")
def built_at(tmp_path_factory) -> str:
    it, iemb, et, eemb = _world()
    out = str(tmp_path_factory.mktemp("built") / "kb")
    build_knowledge_base(it, iemb, et, eemb, FAST, encoder_info={"name": "planted"}, out=out)
    return out


@pytest.fixture(scope="module")
def built(built_at):
    return kb_store.load(built_at)


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
    vectors = {m: np.vstack([s.index(m).vectors for s in built.shards]).astype(np.float32) for m in ("image", "text")}
    shards = build_shards(vectors, FAST.model_copy(update={"index": IndexConfig(shards=3)}))
    sharded = KnowledgeBase(built.entries, built.mapping, shards, built.report, built.manifest)
    single = KnowledgeBase(built.entries, built.mapping, build_shards(vectors, FAST), built.report, built.manifest)
    assert [s.start for s in shards] == [0, len(built) // 3, 2 * len(built) // 3] and len(single.shards) == 1
    q = vectors["image"][:50] + 0.05
    cfg = RetrievalConfig(top_k=10, n_results=4, alpha=0.6)
    a = sharded.retrieve(q, "image", cfg)
    b = single.retrieve(q, "image", cfg)
    np.testing.assert_array_equal(a.ids, b.ids)
    c = retrieve(q, built.pseudo(q, "image"), vectors["image"], vectors["text"], cfg)
    np.testing.assert_array_equal(b.ids, c.ids)
    np.testing.assert_allclose(b.fused, c.fused, atol=1e-5)


def test_text_queries_retrieve_symmetrically(built):
    q = built.shards[0].text.vectors[:20]
    res = built.retrieve(q, "text", RetrievalConfig(top_k=5, n_results=2, alpha=1.0))
    np.testing.assert_array_equal(res.ids[:, 0], np.arange(20))


def test_entries_have_the_stored_schema_and_fetch_each_image_by_reference(built, built_at, tmp_path):
    """One entries schema, in memory or built by ``rag4dmc kb build``: where the image is, never its bytes."""
    from rag4dmc.pipeline.io.kb_images import ExampleImages

    assert built.entries.schema.equals(kb_store.ENTRY_SCHEMA)
    assert built.manifest["format"] == kb_store.FORMAT_VERSION and built.version
    images = ExampleImages(cache_dir=tmp_path / "cache")
    picked = kb_store.take_entries(built.entries, np.array([0, 799, 800, len(built) - 1]))
    for i, got in enumerate(picked["id"]):
        data, why = images.get(picked["image_uri"][i], picked["image_shard"][i], picked["image_row"][i])
        assert why is None and data == f"image of {got}".encode()
    q = built.shards[0].image.vectors[:10]
    np.testing.assert_array_equal(kb_store.load(built_at).retrieve(q, "image").ids, built.retrieve(q, "image").ids)
    only = kb_store.load(built_at, shards=[0], with_entries=False)
    assert len(only.shards) == 1 and only.entries.num_rows == 0


def test_loading_a_missing_kb_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="rag4dmc kb build"):
        kb_store.load(str(tmp_path / "nothing"))


def test_kb_without_external_corpus_is_internal_only():
    it, iemb, _, _ = _world()
    kb = build_knowledge_base(it.drop_columns(["image"]), iemb, None, None, FAST)
    assert len(kb) == 800 and "filter" not in kb.report
    assert kb.entries.column("image_shard").null_count == 800  # no image given: no location


def test_entries_are_memory_mapped_not_copied(tmp_path):
    """A KB's entries can be far larger than an actor's memory: opening them reads nothing."""
    rng = np.random.default_rng(0)
    n, size = 2000, 50_000
    texts = [rng.bytes(size).hex() for _ in range(n)]  # long texts: 200 MB of entries
    table = pa.table({"id": [f"e{i}" for i in range(n)], "source": ["internal"] * n, "text": texts})
    kb_store.write_entries(table, tmp_path / kb_store.ENTRIES_FILE)
    del table
    before = pa.total_allocated_bytes()
    entries = kb_store.open_entries(tmp_path / kb_store.ENTRIES_FILE)
    assert entries.num_rows == n
    assert pa.total_allocated_bytes() - before < size * 10  # not the 200 MB of texts
    picked = kb_store.take_entries(entries, np.array([1999, 0, 7, 7]))
    assert picked["id"] == ["e1999", "e0", "e7", "e7"]
    assert picked["text"][0] == texts[1999] and picked["text"][2] == texts[7]


def test_a_retrieval_actor_loads_only_the_index_it_searches(built, built_at):
    full = kb_store.load(built_at, with_entries=False)
    only_image = kb_store.load(built_at, with_entries=False, searched="image")
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


def test_a_kb_of_another_format_asks_for_a_rebuild(built_at, tmp_path):
    shutil.copytree(built_at, tmp_path / "kb")
    manifest = json.loads((tmp_path / "kb" / "manifest.json").read_text())
    (tmp_path / "kb" / "manifest.json").write_text(json.dumps({**manifest, "format": 1}))
    with pytest.raises(ValueError, match="rebuild it with `rag4dmc kb build`"):
        kb_store.load(str(tmp_path / "kb"))


def test_an_actor_downloads_only_its_part_of_a_remote_kb(s3_server, s3_bucket, tmp_path, monkeypatch):
    """At LAION scale no node holds the whole KB: a retrieval actor fetches its shard group's files and
    the index it searches, a completion actor the entries file. Built straight to object storage."""
    it, iemb, et, eemb = _world(n_int=300, n_ext=200, n_off=50)
    uri, opts = f"{s3_bucket}/kb", s3_server.storage_options
    built = build_knowledge_base(it, iemb, et, eemb, FAST.model_copy(update={"index": IndexConfig(shards=3)}),
                                 out=uri, storage_options=opts)
    monkeypatch.setattr(kb_store.tempfile, "gettempdir", lambda: str(tmp_path))
    cache = tmp_path / "rag4dmc-kb-cache" / built.version

    part = kb_store.load(uri, opts, shards=[1], with_entries=False, searched="text")
    files = {p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file()}
    assert files == {"manifest.json", "mapping.safetensors", "report.json", "shard-00001/image/meta.json",
                     "shard-00001/image/vectors.npy", "shard-00001/text/meta.json",
                     "shard-00001/text/vectors.npy", "shard-00001/text/index.faiss"}
    q = built.shards[1].text.vectors[:5].astype(np.float32)
    got = shard_candidates(part.shards[0], q, part.pseudo(q, "text"), "text", RetrievalConfig())
    want = shard_candidates(built.shards[1], q, built.pseudo(q, "text"), "text", RetrievalConfig())
    np.testing.assert_array_equal(got.ids, want.ids)

    entries = kb_store.load_entries(uri, opts)
    assert (cache / kb_store.ENTRIES_FILE).is_file() and not (cache / "shard-00000").exists()
    assert entries.equals(built.entries)


def _damage(fs, root: str, other_root: str, kind: str) -> str:
    """One damaged file in the KB at ``root`` (``other_root``: a KB of another build); returns its name."""
    if kind == "missing":
        fs.rm(f"{root}/shard-00000/text/vectors.npy")
        return "shard-00000/text/vectors.npy"
    if kind == "truncated":
        data = fs.cat_file(f"{root}/{kb_store.ENTRIES_FILE}")
        fs.pipe_file(f"{root}/{kb_store.ENTRIES_FILE}", data[: len(data) // 2])
        return kb_store.ENTRIES_FILE
    # foreign: the same file of another build (same name; the same size, so only its checksum tells)
    name = kb_store.MAPPING_FILE
    mine, theirs = f"{root}/{name}", f"{other_root}/{name}"
    assert fs.info(mine)["size"] == fs.info(theirs)["size"] and fs.cat_file(mine) != fs.cat_file(theirs)
    fs.pipe_file(mine, fs.cat_file(theirs))
    return name


@pytest.mark.parametrize("kind", ["missing", "truncated"])
def test_a_missing_or_cut_short_kb_file_is_refused_naming_it(built_at, tmp_path, kind):
    """Locally every load checks each file it reads against the manifest's sizes."""
    from fsspec.implementations.local import LocalFileSystem

    copy = tmp_path / "kb"
    shutil.copytree(built_at, copy)
    assert kb_store.load(str(copy)) is not None
    name = _damage(LocalFileSystem(), str(copy), "", kind)
    with pytest.raises(kb_store.KBFileError, match=f"{name} .*(missing|bytes, its manifest says).*copy the knowledge"):
        kb_store.load(str(copy))


@pytest.fixture(scope="module")
def built_on_s3(s3_server) -> Iterator[str]:
    """Two KBs built once, straight to object storage (a bucket of the module's): ``PREFIX/kb``, and
    ``PREFIX/other``, the same data with another mapping seed (another build's files, of the same sizes)."""
    import boto3

    cfg = s3_server.storage_config
    bucket = f"test-kb-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=cfg.endpoint_url, region_name=cfg.region, aws_access_key_id=cfg.key,
                 aws_secret_access_key=cfg.secret).create_bucket(Bucket=bucket)
    it, iemb, et, eemb = _world(n_int=120, n_ext=80, n_off=10)
    opts = s3_server.storage_options
    build_knowledge_base(it, iemb, et, eemb, FAST, out=f"s3://{bucket}/kb", storage_options=opts)
    reseeded = FAST.model_copy(update={"mapping": FAST.mapping.model_copy(update={"seed": 7})})
    build_knowledge_base(it, iemb, et, eemb, reseeded, out=f"s3://{bucket}/other", storage_options=opts)
    yield bucket
    Storage(cfg).fs(f"s3://{bucket}").rm(bucket, recursive=True)


@pytest.mark.parametrize("kind", ["missing", "truncated", "foreign"])
def test_a_damaged_kb_on_object_storage_is_refused_when_a_node_copies_it(s3_server, s3_bucket, built_on_s3, tmp_path,
                                                                         monkeypatch, kind):
    """A KB on object storage: each file a node copies is checked against the manifest's size and the object's
    checksum; a file of another build with the same name and size is caught by its checksum. (Each case damages
    its own copy of the module's two builds, copied object by object, as a user's sync would.)"""
    uri, other = f"{s3_bucket}/kb", f"{s3_bucket}/other"
    fs = Storage(s3_server.storage_config).fs(uri)
    for name in ("kb", "other"):
        fs.copy(f"{built_on_s3}/{name}", f"{s3_bucket.split('://')[1]}/{name}", recursive=True)
    opts = s3_server.storage_options
    manifest = json.loads(Storage(s3_server.storage_config).read_bytes(f"{uri}/manifest.json"))
    assert set(manifest["files"]) == set(kb_store.loaded_files(manifest))
    assert all(f["size"] > 0 and ("etag" in f or "sha256" in f) for f in manifest["files"].values())
    monkeypatch.setattr(kb_store.tempfile, "gettempdir", lambda: str(tmp_path))  # a fresh node cache
    assert kb_store.load(uri, opts) is not None  # the copy, whole, loads
    shutil.rmtree(tmp_path / "rag4dmc-kb-cache")  # and a fresh node cache again
    name = _damage(fs, uri.split("://")[1], other.split("://")[1], kind)
    with pytest.raises(kb_store.KBFileError, match=f"{name} .*(missing|bytes|checksum).*copy the knowledge base"):
        kb_store.load(uri, opts)
    cached = tmp_path / "rag4dmc-kb-cache" / manifest["version"] / name
    assert not cached.exists()  # nothing damaged is left in the node's cache
