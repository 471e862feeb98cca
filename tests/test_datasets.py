"""Dataset I/O: every format reads back what was written, locally and over S3; bad input is reported, not raised."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import fsspec
import pyarrow as pa
import pytest
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from rag4dmc.pipeline.config import ColumnsConfig
from rag4dmc.pipeline.io import datasets
from rag4dmc.pipeline.io.datasets import (
    CANONICAL_SCHEMA,
    SUSPECT_SAMPLE,
    list_shards,
    read_dataset,
    read_shard,
    with_retries,
    write_jsonl,
    write_parquet,
    write_webdataset,
)

FORMATS = ("parquet", "jsonl", "webdataset")
EXTENSION = {"parquet": "parquet", "jsonl": "jsonl", "webdataset": "tar"}
WRITERS = {"parquet": write_parquet, "jsonl": write_jsonl, "webdataset": write_webdataset}


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (i * 40 % 256, 255 - i * 30 % 256, 7)).save(buf, format="PNG")
    return buf.getvalue()


def _pairs(n: int, prefix: str = "s") -> pa.Table:
    """n samples; sample 1 has no image and sample 2 no text (when n allows)."""
    return pa.table({
        "id": [f"{prefix}{i}" for i in range(n)],
        "image": pa.array([None if i == 1 else _png(i) for i in range(n)], pa.binary()),
        "text": [None if i == 2 else f"caption {prefix}{i}" for i in range(n)],
    })


def _write_shards(root: str, fmt: str, tables: list[pa.Table], storage_options: dict | None = None) -> list[str]:
    uris = [f"{root}/part-{j}.{EXTENSION[fmt]}" for j in range(len(tables))]
    for table, uri in zip(tables, uris):
        if fmt == "webdataset":
            write_webdataset(table, uri, storage_options)
        else:
            WRITERS[fmt](table, uri, storage_options)
    return uris


def _image_bytes(table: pa.Table, storage_options: dict | None = None) -> list[bytes | None]:
    """Each row's image: its bytes, or the bytes behind its image_uri."""
    out = []
    for data, uri in zip(table.column("image").to_pylist(), table.column("image_uri").to_pylist()):
        if uri is not None:
            fs, path = fsspec.core.url_to_fs(uri, **(storage_options if "://" in uri else {}))
            data = fs.cat_file(path)
        out.append(data)
    return out


def _assert_round_trip(original: list[pa.Table], uris: list[str], fmt: str, root: str,
                       storage_options: dict | None = None) -> None:
    assert list_shards(root, storage_options) == uris
    table, errors = read_dataset(root, storage_options=storage_options)
    assert errors == []
    assert table.schema == CANONICAL_SCHEMA
    expected = pa.concat_tables(original)
    assert table.column("id").to_pylist() == expected.column("id").to_pylist()
    assert table.column("text").to_pylist() == expected.column("text").to_pylist()
    assert _image_bytes(table, storage_options) == expected.column("image").to_pylist()
    assert table.column("source_shard").to_pylist() == [u for t, u in zip(original, uris) for _ in range(t.num_rows)]
    assert table.column("input_error").null_count == table.num_rows
    if fmt == "jsonl":  # bytes do not fit in JSON: they come back as files named by the image column
        assert table.column("image").null_count == table.num_rows


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_local(tmp_path: Path, fmt: str) -> None:
    original = [_pairs(4, "a"), _pairs(3, "b")]
    root = str(tmp_path / "data")
    uris = _write_shards(root, fmt, original)
    _assert_round_trip(original, uris, fmt, root)


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_s3(s3_server, s3_bucket: str, fmt: str) -> None:
    original = [_pairs(3, "a"), _pairs(4, "b")]
    root = f"{s3_bucket}/corpus"
    uris = _write_shards(root, fmt, original, s3_server.storage_options)
    assert all(u.startswith("s3://") for u in uris)
    _assert_round_trip(original, uris, fmt, root, s3_server.storage_options)


def test_explicit_format_reads_files_with_other_names(tmp_path: Path) -> None:
    uri = str(tmp_path / "samples.data")
    write_parquet(_pairs(3), uri)
    with pytest.raises(ValueError, match="cannot tell the format"):
        read_shard(uri)
    assert read_shard(uri, format="parquet").table.column("id").to_pylist() == ["s0", "s1", "s2"]
    with pytest.raises(ValueError, match="unknown dataset format"):
        read_shard(uri, format="csv")


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_column_names_come_from_the_columns_config(tmp_path: Path, fmt: str) -> None:
    table = pa.table({"key": ["k1", "k2"], "url": ["a/1.png", "a/2.png"], "caption": ["one", "two"],
                      "id": ["wrong", "wrong"], "text": ["wrong", "wrong"], "score": [0.1, 0.2]})
    uri = str(tmp_path / f"renamed.{EXTENSION[fmt]}")
    WRITERS[fmt](table, uri)
    result = read_shard(uri, ColumnsConfig(id="key", image="url", text="caption"))
    assert result.errors == []
    assert result.table.column("id").to_pylist() == ["k1", "k2"]
    assert result.table.column("text").to_pylist() == ["one", "two"]
    assert result.table.column("image_uri").to_pylist() == [f"{tmp_path}/a/1.png", f"{tmp_path}/a/2.png"]


def test_webdataset_id_comes_from_the_json_metadata(tmp_path: Path) -> None:
    uri = str(tmp_path / "shard.tar")
    write_webdataset(pa.table({"uid": ["u7", "u9"], "image": [_png(1), _png(2)], "text": ["x", "y"]}), uri)
    assert read_shard(uri, ColumnsConfig(id="uid")).table.column("id").to_pylist() == ["u7", "u9"]
    # without that column in the metadata, the tar key is the id
    assert read_shard(uri).table.column("id").to_pylist() == ["000000000", "000000001"]


def test_neither_modality_column_is_a_shard_error_naming_the_columns(tmp_path: Path) -> None:
    uri = str(tmp_path / "p.parquet")
    write_parquet(pa.table({"id": ["a"], "jpg": [b"x"], "caption": ["c"]}), uri)
    result = read_shard(uri)
    assert result.table.num_rows == 0
    assert len(result.errors) == 1 and "'image'" in result.errors[0] and "caption" in result.errors[0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_null_empty_and_blank_values_mean_missing(tmp_path: Path, fmt: str) -> None:
    table = pa.table({"id": ["a", "b", "c", "d"], "image": pa.array([b"", None, _png(1), _png(2)], pa.binary()),
                      "text": ["", "  \n", None, "present"]})
    uri = str(tmp_path / f"x.{EXTENSION[fmt]}")
    WRITERS[fmt](table, uri)
    got = read_shard(uri).table
    assert got.column("text").to_pylist() == [None, None, None, "present"]
    assert [b is not None for b in _image_bytes(got)] == [False, False, True, True]


def test_a_value_of_the_wrong_type_is_a_row_error_and_the_other_rows_are_read(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    rows = [{"id": 1, "text": "fine"}, {"id": 2, "text": 42}, "not an object", {"id": 3, "image": 5, "text": "t"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken json\n")
    result = read_shard(str(path))
    assert result.table.column("id").to_pylist() == ["1", "2", "3"]
    assert result.table.column("text").to_pylist() == ["fine", None, "t"]
    problems = result.table.column("input_error").to_pylist()
    assert problems[0] is None and "text is not a string" in problems[1] and "image is neither" in problems[2]
    assert len(result.errors) == 2
    assert "line 3" in result.errors[0] and "line 5" in result.errors[1]


def test_missing_ids_are_derived_from_shard_and_row(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for j in range(2):
        write_parquet(pa.table({"text": [f"t{j}{i}" for i in range(3)]}), str(root / f"part-{j}.parquet"))
    first, _ = read_dataset(str(root))
    again, _ = read_dataset(str(root))
    ids = first.column("id").to_pylist()
    assert ids == again.column("id").to_pylist()
    assert len(set(ids)) == 6
    assert all(i.startswith("part-0.parquet") for i in ids[:3]) and all(i.startswith("part-1.parquet") for i in ids[3:])


def test_image_column_with_paths_and_uris(tmp_path: Path) -> None:
    image = pa.array([{"bytes": _png(3), "path": "ignored.png"}, {"bytes": None, "path": "hf/2.png"}],
                     pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    write_parquet(pa.table({"id": ["a", "b"], "image": image, "text": ["x", "y"]}), str(tmp_path / "hf.parquet"))
    hf = read_shard(str(tmp_path / "hf.parquet")).table
    assert hf.column("image").to_pylist() == [_png(3), None]
    assert hf.column("image_uri").to_pylist() == [None, f"{tmp_path}/hf/2.png"]

    uris = ["images/1.png", "/abs/2.png", "s3://bucket/3.png", "https://example.org/4.jpg", " "]
    write_parquet(pa.table({"id": list("abcde"), "image": uris, "text": list("vwxyz")}), str(tmp_path / "u.parquet"))
    got = read_shard(str(tmp_path / "u.parquet")).table
    assert got.column("image").null_count == 5
    assert got.column("image_uri").to_pylist() == [
        f"{tmp_path}/images/1.png", "/abs/2.png", "s3://bucket/3.png", "https://example.org/4.jpg", None]


def test_corrupt_parquet_shard_is_reported_and_the_others_are_read(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_parquet(_pairs(2, "a"), str(root / "part-0.parquet"))
    (root / "part-1.parquet").write_bytes(b"PAR1 this is not a parquet file PAR1")
    write_parquet(_pairs(3, "c"), str(root / "part-2.parquet"))
    table, errors = read_dataset(str(root))
    assert table.column("id").to_pylist() == ["a0", "a1", "c0", "c1", "c2"]
    assert len(errors) == 1
    assert errors[0].startswith(f"corrupt parquet shard {root}/part-1.parquet")
    result = read_shard(str(root / "part-1.parquet"))
    assert result.table.num_rows == 0 and result.table.schema == CANONICAL_SCHEMA


def _member_offsets(tar_bytes: bytes) -> dict[str, tuple[int, int]]:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return {m.name: (m.offset, m.offset_data) for m in tar.getmembers()}


def test_corrupt_tar_header_is_reported_and_the_rest_of_the_tar_is_read(tmp_path: Path) -> None:
    uri = tmp_path / "shard.tar"
    write_webdataset(_pairs(6), str(uri))
    data = bytearray(uri.read_bytes())
    header, _ = _member_offsets(bytes(data))["000000003.png"]
    data[header:header + 100] = b"\xff" * 100  # garbage name: the header checksum no longer matches
    uri.write_bytes(bytes(data))

    result = read_shard(str(uri))
    assert len(result.errors) == 1 and "corrupt tar member" in result.errors[0]
    rows = {r["id"]: r for r in result.table.to_pylist()}
    assert list(rows) == ["s0", "s1", "s2", "s3", "s4", "s5"]
    for i in (0, 1, 4, 5):  # away from the damage: intact and clean
        assert rows[f"s{i}"]["image"] == (None if i == 1 else _png(i))
        assert rows[f"s{i}"]["input_error"] is None
    # s3 lost its image: it must not pass for a text-only sample, so it is marked (as is s2 before the gap)
    assert rows["s3"]["image"] is None and rows["s3"]["text"] == "caption s3"
    assert rows["s3"]["input_error"] == SUSPECT_SAMPLE
    assert rows["s2"]["input_error"] == SUSPECT_SAMPLE


def test_truncated_tar_reports_the_member_and_keeps_the_samples_before_it(tmp_path: Path) -> None:
    uri = tmp_path / "shard.tar"
    write_webdataset(_pairs(5), str(uri))
    data = uri.read_bytes()
    _, text_data = _member_offsets(data)["000000003.txt"]
    uri.write_bytes(data[:text_data + 3])  # cut inside the caption of sample 3, after its image

    result = read_shard(str(uri))
    assert len(result.errors) == 1 and "000000003.txt" in result.errors[0] and "truncated" in result.errors[0]
    rows = {r["id"]: r for r in result.table.to_pylist()}
    assert [rows[f"s{i}"]["input_error"] for i in range(3)] == [None, None, None]
    assert rows["s0"]["image"] == _png(0) and rows["s0"]["text"] == "caption s0"
    # sample 3 (keyed by its tar key: its .json was never reached) has its image but lost its caption:
    # it is marked, so it is not mistaken for an image-only sample whose text should be generated
    assert rows["000000003"]["image"] == _png(3) and rows["000000003"]["input_error"] == SUSPECT_SAMPLE
    assert "000000004" not in rows


def test_a_file_that_is_not_a_tar_is_a_reported_shard_error(tmp_path: Path) -> None:
    uri = tmp_path / "shard.tar"
    uri.write_bytes(b"\x17" * 3000)
    result = read_shard(str(uri))
    assert result.table.num_rows == 0
    assert len(result.errors) == 1 and "corrupt tar" in result.errors[0]


def test_nonexistent_input_or_no_shards_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"input {tmp_path}/nope does not exist"):
        read_dataset(str(tmp_path / "nope"))
    (tmp_path / "notes.txt").write_text("no data here")
    (tmp_path / "_SUCCESS.parquet").write_text("")
    with pytest.raises(FileNotFoundError, match=r"no shards under .*\.parquet"):
        list_shards(str(tmp_path))


def test_nonexistent_bucket_is_a_clear_error(s3_server) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_shards("s3://no-such-bucket-here/data", s3_server.storage_options)


def test_mixed_formats_need_an_explicit_format(tmp_path: Path) -> None:
    write_webdataset(_pairs(2), str(tmp_path / "00000.tar"))
    write_parquet(pa.table({"key": ["0"], "status": ["success"]}), str(tmp_path / "00000.parquet"))
    with pytest.raises(ValueError, match="several formats"):
        list_shards(str(tmp_path))
    assert list_shards(str(tmp_path), format="webdataset") == [f"{tmp_path}/00000.tar"]


class FlakyFileSystem(LocalFileSystem):
    """Local files behind an unreliable link: the first ``failures`` opens raise ``ConnectionError``."""

    protocol = "flaky"
    cachable = False

    def __init__(self, failures: int = 0, opens: list | None = None, **kwargs):
        super().__init__(**kwargs)
        self.failures, self.opens = failures, opens if opens is not None else []

    def _open(self, path, mode="rb", **kwargs):
        self.opens.append(path)
        if len(self.opens) <= self.failures:
            raise ConnectionError(f"simulated connection reset #{len(self.opens)}")
        return super()._open(path, mode, **kwargs)


@pytest.fixture
def flaky(monkeypatch: pytest.MonkeyPatch) -> None:
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    monkeypatch.setattr(datasets, "RETRY_BASE_DELAY_S", 0.001)


def test_transient_storage_errors_are_retried(tmp_path: Path, flaky: None) -> None:
    write_parquet(_pairs(3), str(tmp_path / "d" / "part-0.parquet"))
    opens: list = []
    table, errors = read_dataset(f"flaky://{tmp_path}/d", storage_options={"failures": 2, "opens": opens})
    assert errors == [] and table.column("id").to_pylist() == ["s0", "s1", "s2"]
    assert len(opens) == 3


def test_storage_that_keeps_failing_is_a_shard_error_not_an_exception(tmp_path: Path, flaky: None) -> None:
    write_parquet(_pairs(3), str(tmp_path / "part-0.parquet"))
    opens: list = []
    result = read_shard(f"flaky://{tmp_path}/part-0.parquet", storage_options={"failures": 99, "opens": opens},
                        attempts=3)
    assert result.table.num_rows == 0 and len(opens) == 3
    assert "could not read shard" in result.errors[0] and "after 3 attempts: ConnectionError" in result.errors[0]


def test_with_retries_backs_off_and_gives_up_on_permanent_errors() -> None:
    delays: list[float] = []
    calls = iter([TimeoutError("slow"), ConnectionResetError("reset"), "ok"])

    def flaky_call():
        outcome = next(calls)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert with_retries(flaky_call, attempts=3, base_delay=0.1, sleep=delays.append) == "ok"
    assert len(delays) == 2 and 0.1 <= delays[0] < delays[1]

    missing_calls: list[int] = []

    def missing():
        missing_calls.append(1)
        raise FileNotFoundError("gone")

    with pytest.raises(FileNotFoundError):
        with_retries(missing, attempts=5, sleep=delays.append)
    assert len(missing_calls) == 1

    down_calls: list[int] = []

    def down():
        down_calls.append(1)
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        with_retries(down, attempts=2, sleep=delays.append)
    assert len(down_calls) == 2



def test_shards_read_in_ray_tasks_match_the_driver(ray_local, s3_server, s3_bucket: str) -> None:
    uris = _write_shards(f"{s3_bucket}/corpus", "webdataset", [_pairs(3, "a"), _pairs(2, "b")],
                         s3_server.storage_options)
    remote_read = ray_local.remote(read_shard)
    results = ray_local.get([remote_read.remote(u, storage_options=s3_server.storage_options) for u in uris])
    assert [r.errors for r in results] == [[], []]
    in_tasks = pa.concat_tables([r.table for r in results])
    on_driver, _ = read_dataset(f"{s3_bucket}/corpus", storage_options=s3_server.storage_options)
    assert in_tasks.equals(on_driver)
