"""The clip-retrieval embedding layout: what is written reads back, in pieces, locally and over S3; bad layouts are
refused with the shard and file named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from rag4dmc.pipeline.io import embedding_layout as layout
from rag4dmc.pipeline.io.embedding_layout import (
    EmbeddingShard,
    LayoutError,
    check_dims,
    list_embedding_shards,
    read_metadata,
    read_rows,
    read_vectors,
    shard_offsets,
    total_rows,
    write_embedding_shard,
    written_numbers,
)

IMAGE_DIM, TEXT_DIM = 24, 16
FP16_TOLERANCE = 1e-3  # unit-scale values: float16 keeps ~3 decimal digits


def _vectors(rows: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32) / 4


def _metadata(number: str, rows: int) -> pa.Table:
    return pa.table({"caption": [f"caption {number}/{i}" for i in range(rows)],
                     "url": [f"https://example.com/{number}/{i}.jpg" for i in range(rows)],
                     "key": [f"{number}{i:04d}" for i in range(rows)],
                     "width": list(range(rows))})


def _write_layout(root: str, sizes: dict[str, int], dtype: str = "float16", storage_options: dict | None = None,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Write shards ``number -> rows``; return the concatenated image and text matrices in shard order."""
    images, texts = [], []
    for seed, (number, rows) in enumerate(sizes.items()):
        image, text = _vectors(rows, IMAGE_DIM, seed), _vectors(rows, TEXT_DIM, 100 + seed)
        write_embedding_shard(root, number, image, text, _metadata(number, rows), storage_options, dtype=dtype)
        images.append(image)
        texts.append(text)
    return np.concatenate(images), np.concatenate(texts)


def _plant(root: Path, number: str, image: np.ndarray, text: np.ndarray, metadata: pa.Table, **parquet) -> None:
    """Write a shard's three files by hand (no checks), as another tool might have."""
    for folder in ("img_emb", "text_emb", "metadata"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    np.save(root / "img_emb" / f"img_emb_{number}.npy", image)
    np.save(root / "text_emb" / f"text_emb_{number}.npy", text)
    pq.write_table(metadata, root / "metadata" / f"metadata_{number}.parquet", **parquet)


class CountingFS(LocalFileSystem):
    """A local filesystem that records every ranged read (start, end) and the bytes files hand out."""

    def __init__(self):
        super().__init__(skip_instance_cache=True)
        self.ranges: list[tuple[int | None, int | None]] = []
        self.bytes_read = 0

    def cat_file(self, path, start=None, end=None, **kwargs):
        self.ranges.append((start, end))
        return super().cat_file(path, start=start, end=end, **kwargs)

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        f = super()._open(path, mode, block_size, **kwargs)
        if "r" in mode:
            read = f.read

            def counted(*args, **kw):
                data = read(*args, **kw)
                self.bytes_read += len(data)
                return data
            f.read = counted
        return f


@pytest.fixture
def counting_fs(monkeypatch) -> CountingFS:
    fs = CountingFS()
    monkeypatch.setattr(layout, "url_to_fs", lambda uri, storage_options=None: (fs, fs._strip_protocol(uri)))
    return fs


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip(tmp_path: Path, dtype: str):
    root = str(tmp_path / "emb")
    image, text = _write_layout(root, {"0": 40, "1": 1, "2": 25}, dtype=dtype)
    shards = list_embedding_shards(root)
    assert [s.number for s in shards] == ["0", "1", "2"]
    assert [s.rows for s in shards] == [40, 1, 25]
    assert shards[0] == EmbeddingShard("0", f"{root}/img_emb/img_emb_0.npy", f"{root}/text_emb/text_emb_0.npy",
                                       f"{root}/metadata/metadata_0.parquet", 40, IMAGE_DIM, TEXT_DIM, dtype, dtype)
    tol = FP16_TOLERANCE if dtype == "float16" else 0
    got_image = np.concatenate([read_vectors(s.image, 0, s.rows) for s in shards])
    got_text = np.concatenate([read_vectors(s.text, 0, s.rows) for s in shards])
    assert got_image.dtype == got_text.dtype == np.float32
    np.testing.assert_allclose(got_image, image, atol=tol, rtol=0)
    np.testing.assert_allclose(got_text, text, atol=tol, rtol=0)
    meta = read_metadata(shards[2])
    assert meta.schema == layout.METADATA_SCHEMA
    assert meta["id"].to_pylist() == [f"2{i:04d}" for i in range(25)]
    assert meta["text"].to_pylist() == [f"caption 2/{i}" for i in range(25)]
    assert meta["image_uri"].to_pylist() == [f"https://example.com/2/{i}.jpg" for i in range(25)]
    assert meta["row"].to_pylist() == list(range(25))
    assert total_rows(shards) == 66
    assert shard_offsets(shards).tolist() == [0, 40, 41, 66]
    assert shard_offsets(shards).dtype == np.int64


def test_shards_sorted_by_number_and_named_as_written(tmp_path: Path):
    root = str(tmp_path)
    _write_layout(root, {"10": 2, "9": 3, "00002": 4})
    shards = list_embedding_shards(root)
    assert [s.number for s in shards] == ["00002", "9", "10"]
    assert shards[0].image.endswith("/img_emb/img_emb_00002.npy")
    assert shards[0].metadata.endswith("/metadata/metadata_00002.parquet")


def test_read_vectors_middle_range_equals_the_slice(tmp_path: Path):
    image, _ = _write_layout(str(tmp_path), {"0": 50}, dtype="float32")
    uri = list_embedding_shards(str(tmp_path))[0].image
    np.testing.assert_array_equal(read_vectors(uri, 17, 33), image[17:33])
    assert read_vectors(uri, 20, 20).shape == (0, IMAGE_DIM)
    with pytest.raises(ValueError, match="50 rows"):
        read_vectors(uri, 40, 51)


def test_read_vectors_reads_the_header_and_the_range_only(tmp_path: Path, counting_fs: CountingFS):
    rows, start, stop = 20_000, 9_000, 9_100
    image, _ = _write_layout(str(tmp_path), {"0": rows}, dtype="float32")
    uri = f"{tmp_path}/img_emb/img_emb_0.npy"
    size = Path(uri).stat().st_size
    got = read_vectors(uri, start, stop)
    np.testing.assert_array_equal(got, image[start:stop])
    wanted = (stop - start) * IMAGE_DIM * 4
    assert wanted <= counting_fs.bytes_read <= layout.HEADER_PROBE_BYTES + wanted < size / 100
    data_reads = [r for r in counting_fs.ranges if r[0] != 0]
    assert len(data_reads) == 1 and data_reads[0][1] - data_reads[0][0] == wanted


def test_read_rows_of_shuffled_ids_across_shards(tmp_path: Path):
    image, text = _write_layout(str(tmp_path), {"0": 300, "1": 7, "2": 450})
    shards = list_embedding_shards(str(tmp_path))
    offsets = shard_offsets(shards)
    ids = np.random.default_rng(3).permutation(total_rows(shards))[:200]
    ids = np.concatenate([ids, ids[:5], [0, total_rows(shards) - 1]])  # duplicates and both ends
    np.testing.assert_allclose(read_rows(shards, offsets, ids, "image"), image[ids], atol=FP16_TOLERANCE, rtol=0)
    np.testing.assert_allclose(read_rows(shards, offsets, ids, "text"), text[ids], atol=FP16_TOLERANCE, rtol=0)
    assert read_rows(shards, offsets, np.array([], dtype=np.int64), "image").shape == (0, IMAGE_DIM)
    with pytest.raises(ValueError, match="outside"):
        read_rows(shards, offsets, np.array([total_rows(shards)]), "image")
    with pytest.raises(ValueError, match="modality"):
        read_rows(shards, offsets, ids, "audio")


def test_read_rows_coalesces_nearby_ids_into_few_reads(tmp_path: Path, counting_fs: CountingFS):
    image, _ = _write_layout(str(tmp_path), {"0": 2000, "1": 2000, "2": 2000}, dtype="float32")
    shards = list_embedding_shards(str(tmp_path))
    offsets = shard_offsets(shards)
    ids = np.random.default_rng(5).choice(6000, size=600, replace=False)  # ~10 rows apart: one run per shard
    counting_fs.ranges.clear()
    np.testing.assert_array_equal(read_rows(shards, offsets, ids, "image"), image[ids])
    data_reads = [r for r in counting_fs.ranges if r[0] != 0]
    assert len(data_reads) <= 3 * 2, data_reads
    counting_fs.ranges.clear()
    far = np.array([4100, 10, 1000, 4000])  # gaps of hundreds of rows: one read each
    np.testing.assert_array_equal(read_rows(shards, offsets, far, "image"), image[far])
    data_reads = sorted(r for r in counting_fs.ranges if r[0] != 0)
    assert len(data_reads) == 4 and all(end - start == IMAGE_DIM * 4 for start, end in data_reads)


def test_ids_from_key_then_id_then_derived(tmp_path: Path):
    image, text = _vectors(3, IMAGE_DIM, 0), _vectors(3, TEXT_DIM, 1)
    _plant(tmp_path, "00007", image, text, pa.table({"caption": ["a", "b", "c"], "key": ["k0", None, "k2"],
                                                      "id": [5, 6, 7]}))
    _plant(tmp_path, "00008", image, text, pa.table({"caption": ["a", "b", "c"], "id": [5, 6, 7]}))
    _plant(tmp_path, "00009", image, text, pa.table({"caption": ["a", "b", "c"]}))
    keyed, numbered, derived = list_embedding_shards(str(tmp_path))
    assert read_metadata(keyed)["id"].to_pylist() == ["k0", "00007:1", "k2"]  # a null key is derived too
    assert read_metadata(numbered)["id"].to_pylist() == ["5", "6", "7"]
    assert read_metadata(derived)["id"].to_pylist() == ["00009:0", "00009:1", "00009:2"]
    assert read_metadata(derived, start=1, stop=3)["id"].to_pylist() == ["00009:1", "00009:2"]
    assert read_metadata(derived)["image_uri"].null_count == 3  # no image column: null


def test_url_kept_and_relative_image_path_resolved_against_the_root(tmp_path: Path):
    image, text = _vectors(4, IMAGE_DIM, 0), _vectors(4, TEXT_DIM, 1)
    _plant(tmp_path, "0", image, text, pa.table({"caption": ["a", " ", None, "d"],
                                                 "url": ["http://x/a.jpg", "x/b.jpg", None, ""]}))
    _plant(tmp_path, "1", image, text, pa.table({"text": ["a", "b", "c", "d"],
                                                 "image_path": ["images/a.jpg", "/abs/b.jpg", "s3://b/c.jpg", " "]}))
    by_url, by_path = list_embedding_shards(str(tmp_path))
    meta = read_metadata(by_url)
    assert meta["image_uri"].to_pylist() == ["http://x/a.jpg", "x/b.jpg", None, None]
    assert meta["text"].to_pylist() == ["a", None, None, "d"]  # blank text is missing text
    meta = read_metadata(by_path)
    assert meta["image_uri"].to_pylist() == [f"{tmp_path}/images/a.jpg", "/abs/b.jpg", "s3://b/c.jpg", None]
    assert meta["text"].to_pylist() == ["a", "b", "c", "d"]


def test_read_metadata_of_a_row_range_across_row_groups(tmp_path: Path):
    rows = 30
    _plant(tmp_path, "0", _vectors(rows, IMAGE_DIM, 0), _vectors(rows, TEXT_DIM, 1), _metadata("0", rows),
           row_group_size=4)
    shard = list_embedding_shards(str(tmp_path))[0]
    meta = read_metadata(shard, start=5, stop=19)
    assert meta["row"].to_pylist() == list(range(5, 19))
    assert meta["text"].to_pylist() == [f"caption 0/{i}" for i in range(5, 19)]
    assert read_metadata(shard, start=30).num_rows == 0
    with pytest.raises(ValueError, match="30 rows"):
        read_metadata(shard, start=0, stop=31)


def test_read_metadata_of_sampled_rows_reads_only_their_row_groups(tmp_path: Path, monkeypatch):
    rows = 40
    _plant(tmp_path, "0", _vectors(rows, IMAGE_DIM, 0), _vectors(rows, TEXT_DIM, 1), _metadata("0", rows),
           row_group_size=4)
    shard = list_embedding_shards(str(tmp_path))[0]
    every_id = read_metadata(shard)["id"]
    read_groups = []
    original = pq.ParquetFile.read_row_groups
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups",
                        lambda self, groups, **kw: read_groups.extend(groups) or original(self, groups, **kw))
    sample = np.array([33, 5, 6, 21, 5])  # any order, repeats allowed
    meta = read_metadata(shard, rows=sample)
    assert meta["row"].to_pylist() == sample.tolist()
    assert meta["text"].to_pylist() == [f"caption 0/{i}" for i in sample]
    assert meta["id"].to_pylist() == every_id.take(pa.array(sample)).to_pylist()
    assert sorted(read_groups) == [1, 5, 8]  # rows 5-6, 21 and 33: three of the ten row groups
    assert read_metadata(shard, rows=np.array([], np.int64)).num_rows == 0
    with pytest.raises(ValueError, match="40 rows"):
        read_metadata(shard, rows=np.array([40]))


def test_misaligned_shard_is_refused_naming_the_shard_and_counts(tmp_path: Path):
    _write_layout(str(tmp_path), {"0": 4})
    _plant(tmp_path, "3", _vectors(10, IMAGE_DIM, 0), _vectors(10, TEXT_DIM, 1), _metadata("3", 9))
    with pytest.raises(LayoutError, match=r"shard 3 .*10 rows.*10.*metadata_3.parquet has 9"):
        list_embedding_shards(str(tmp_path))
    with pytest.raises(LayoutError, match=r"shard 5 is misaligned: 10 image rows, 10 text rows, 9 metadata rows"):
        write_embedding_shard(str(tmp_path), "5", _vectors(10, IMAGE_DIM, 0), _vectors(10, TEXT_DIM, 1),
                              _metadata("5", 9))
    assert "5" not in written_numbers(str(tmp_path))


def test_missing_partner_file_is_named(tmp_path: Path):
    _write_layout(str(tmp_path), {"0": 3, "1": 3, "2": 3})
    (tmp_path / "text_emb" / "text_emb_1.npy").unlink()
    (tmp_path / "metadata" / "metadata_2.parquet").unlink()
    with pytest.raises(LayoutError) as err:
        list_embedding_shards(str(tmp_path))
    message = str(err.value)
    assert "shard 1 has img_emb/img_emb_1.npy and metadata/metadata_1.parquet but lacks text_emb/text_emb_1.npy" \
        in message
    assert "shard 2 has img_emb/img_emb_2.npy and text_emb/text_emb_2.npy but lacks metadata/metadata_2.parquet" \
        in message
    assert "shard 0" not in message


def test_no_embeddings_under_the_root(tmp_path: Path):
    with pytest.raises(LayoutError, match="no img_emb/img_emb_N.npy files under"):
        list_embedding_shards(str(tmp_path / "nowhere"))


def test_dimension_mismatch_names_both_dims(tmp_path: Path):
    _write_layout(str(tmp_path), {"0": 3})
    shards = list_embedding_shards(str(tmp_path))
    check_dims(shards, IMAGE_DIM, TEXT_DIM, "external embeddings")
    with pytest.raises(LayoutError, match=f"external embeddings have {IMAGE_DIM}-d image embeddings.*makes 512-d"):
        check_dims(shards, 512, TEXT_DIM, "external embeddings")
    with pytest.raises(LayoutError, match=f"have {TEXT_DIM}-d text embeddings.*makes 768-d"):
        check_dims(shards, IMAGE_DIM, 768, "external embeddings")


def test_dims_that_differ_between_shards_are_refused(tmp_path: Path):
    _write_layout(str(tmp_path), {"0": 3})
    _plant(tmp_path, "1", _vectors(3, IMAGE_DIM + 1, 0), _vectors(3, TEXT_DIM, 1), _metadata("1", 3))
    with pytest.raises(LayoutError, match=f"shard 1 has {IMAGE_DIM + 1}-d image.*shard 0 has {IMAGE_DIM}-d"):
        list_embedding_shards(str(tmp_path))


def test_int8_and_non_2d_files_are_refused(tmp_path: Path):
    _plant(tmp_path, "0", np.ones((3, IMAGE_DIM), np.int8), _vectors(3, TEXT_DIM, 1), _metadata("0", 3))
    with pytest.raises(LayoutError, match=r"img_emb_0\.npy holds int8 values"):
        list_embedding_shards(str(tmp_path))
    with pytest.raises(LayoutError, match="int8"):
        read_vectors(str(tmp_path / "img_emb" / "img_emb_0.npy"), 0, 1)
    np.save(tmp_path / "img_emb" / "img_emb_0.npy", np.ones(3, np.float32))
    with pytest.raises(LayoutError, match=r"img_emb_0\.npy holds an array of shape \(3,\)"):
        list_embedding_shards(str(tmp_path))


def test_truncated_npy_is_refused(tmp_path: Path):
    _write_layout(str(tmp_path), {"0": 10})
    path = tmp_path / "img_emb" / "img_emb_0.npy"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(LayoutError, match=r"img_emb_0\.npy is truncated"):
        list_embedding_shards(str(tmp_path))
    with pytest.raises(LayoutError, match="truncated"):
        read_vectors(str(path), 5, 10)


def test_metadata_without_text_column_names_the_file_and_its_columns(tmp_path: Path):
    _plant(tmp_path, "4", _vectors(2, IMAGE_DIM, 0), _vectors(2, TEXT_DIM, 1),
           pa.table({"url": ["a", "b"], "key": ["x", "y"]}))
    with pytest.raises(LayoutError, match=r"metadata_4\.parquet has no text column.*\['url', 'key'\]"):
        list_embedding_shards(str(tmp_path))


def test_written_numbers_are_the_complete_shards(tmp_path: Path):
    root = tmp_path / "out"
    assert written_numbers(str(root)) == set()
    _write_layout(str(root), {"000": 2, "001": 3})
    assert written_numbers(str(root)) == {"000", "001"}
    np.save(root / "img_emb" / "img_emb_002.npy", _vectors(2, IMAGE_DIM, 0))  # an interrupted writer's leftovers
    assert written_numbers(str(root)) == {"000", "001"}
    assert not list(root.rglob("*.tmp"))
    shard = write_embedding_shard(str(root), "001", _vectors(1, IMAGE_DIM, 9), _vectors(1, TEXT_DIM, 9),
                                  _metadata("001", 1), dtype="float32")  # rewriting a shard replaces it
    assert shard.rows == 1 and written_numbers(str(root)) == {"000", "001"}
    np.testing.assert_array_equal(read_vectors(shard.image, 0, 1), _vectors(1, IMAGE_DIM, 9))


def test_writer_refuses_what_the_reader_would(tmp_path: Path):
    image, text = _vectors(2, IMAGE_DIM, 0), _vectors(2, TEXT_DIM, 1)
    with pytest.raises(LayoutError, match="no text column"):
        write_embedding_shard(str(tmp_path), "0", image, text, pa.table({"url": ["a", "b"]}))
    with pytest.raises(ValueError, match="digits"):
        write_embedding_shard(str(tmp_path), "x1", image, text, _metadata("0", 2))
    with pytest.raises(ValueError, match="dtype"):
        write_embedding_shard(str(tmp_path), "0", image, text, _metadata("0", 2), dtype="int8")
    with pytest.raises(LayoutError, match="float16's range"):
        write_embedding_shard(str(tmp_path), "0", image * 1e6, text, _metadata("0", 2))
    assert written_numbers(str(tmp_path)) == set()


def test_layout_on_s3(s3_bucket: str, s3_server):
    options = s3_server.storage_options
    root = f"{s3_bucket}/laion/emb"
    assert written_numbers(root, options) == set()
    image, text = _write_layout(root, {"00000": 30, "00001": 12}, dtype="float16", storage_options=options)
    assert written_numbers(root, options) == {"00000", "00001"}
    shards = list_embedding_shards(root, options)
    assert [(s.number, s.rows, s.image_dtype) for s in shards] == [("00000", 30, "float16"), ("00001", 12, "float16")]
    assert shards[1].image == f"{root}/img_emb/img_emb_00001.npy"
    np.testing.assert_allclose(read_vectors(shards[0].text, 10, 20, options), text[10:20], atol=FP16_TOLERANCE,
                               rtol=0)
    ids = np.random.default_rng(1).permutation(42)
    np.testing.assert_allclose(read_rows(shards, shard_offsets(shards), ids, "image", options), image[ids],
                               atol=FP16_TOLERANCE, rtol=0)
    meta = read_metadata(shards[1], options, start=2, stop=5)
    assert meta["id"].to_pylist() == ["000010002", "000010003", "000010004"]
    assert meta["image_uri"].to_pylist() == [f"https://example.com/00001/{i}.jpg" for i in (2, 3, 4)]


def test_misaligned_and_incomplete_layouts_on_s3(s3_bucket: str, s3_server):
    import s3fs

    options = s3_server.storage_options
    root = f"{s3_bucket}/emb"
    _write_layout(root, {"0": 5, "1": 5}, storage_options=options)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    with fs.open(f"{root}/metadata/metadata_1.parquet", "wb") as f:
        pq.write_table(_metadata("1", 4), f)
    with pytest.raises(LayoutError, match=r"shard 1 is misaligned.*has 5 rows.*has 5.*has 4"):
        list_embedding_shards(root, options)
    fs.rm(f"{root}/text_emb/text_emb_0.npy")
    with pytest.raises(LayoutError, match=r"shard 0 .*lacks text_emb/text_emb_0\.npy"):
        list_embedding_shards(root, options)


@pytest.mark.parametrize("array", [np.zeros((5, 3), "<f4"), np.zeros((2, 7), "<f2"), np.zeros((4,), ">f8"),
                                   np.zeros((), "<i8"), np.asfortranarray(np.zeros((3, 2), "<f4")),
                                   np.zeros((1, 2, 3), "<f4")])
def test_npy_headers_are_read_as_numpy_reads_them(tmp_path: Path, array: np.ndarray):
    import io as io_

    np.save(tmp_path / "a.npy", array)
    data = (tmp_path / "a.npy").read_bytes()
    buf = io_.BytesIO(data)
    version = np.lib.format.read_magic(buf)
    want = (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(buf)
    header_len = int.from_bytes(data[8:10], "little") if version == (1, 0) else int.from_bytes(data[8:12], "little")
    start = 10 if version == (1, 0) else 12
    assert layout.npy_header_fields(data[start:start + header_len].decode("latin1")) == want


def test_a_header_other_than_numpy_saves_is_refused():
    with pytest.raises(ValueError, match="three keys"):
        layout.npy_header_fields("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (3,), 'x': 1}")
    with pytest.raises(ValueError, match="no plain descr"):
        layout.npy_header_fields("{'descr': [('a', '<f4'), ('b', '<f4')], 'fortran_order': False, 'shape': (3,)}")


def test_the_layout_reads_its_shards_headers_on_threads_without_building_an_ast(tmp_path: Path, monkeypatch):
    """Building ASTs in two threads at once can fail on Python 3.11 before 3.11.8 (CPython gh-106905): numpy's
    header reader builds one per header, and the layout reads headers on a thread pool. With every way to build an
    AST failing, listing and reading a layout of several shards still works: none is built."""
    import ast

    image, _ = _write_layout(str(tmp_path), {"0": 30, "1": 20, "2": 10})

    def no_ast(*args, **kwargs):
        raise AssertionError("an AST was built")

    monkeypatch.setattr(ast, "parse", no_ast)
    monkeypatch.setattr(ast, "literal_eval", no_ast)
    shards = list_embedding_shards(str(tmp_path))
    ids = np.array([0, 35, 59, 12])
    np.testing.assert_allclose(read_rows(shards, shard_offsets(shards), ids, "image"), image[ids],
                               atol=FP16_TOLERANCE, rtol=0)
