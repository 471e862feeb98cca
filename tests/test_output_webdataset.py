"""`rag4dmc complete --output-format webdataset`: committed blocks as img2dataset-style tars that read back into
the output rows, resume from them, and never mix with a run of the other format."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path
from typing import get_args

import pyarrow as pa
import pytest
from PIL import Image

from rag4dmc.pipeline.config import JobConfig
from rag4dmc.pipeline.demo.corpus import write_split
from rag4dmc.pipeline.io.datasets import read_shard, write_parquet
from rag4dmc.pipeline.io.storage import Storage
from rag4dmc.pipeline.job.runner import RUN_FILE, SUMMARY_FILE, JobSpec, RunMismatch, _check_run, run_job
from rag4dmc.pipeline.job.writer import (
    OUTPUT_FORMATS,
    committed_keys,
    count_output_rows,
    file_name,
    output_files,
    output_tar,
    read_output,
    read_tar,
    shard_dir,
    tar_key,
    write_file,
)
from rag4dmc.pipeline.schema import OUTPUT_SCHEMA, STAGES
from tests.test_job import FLOW_SELECTION, JOB, _incomplete

KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _image(fmt: str, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 5), colour).save(buf, format=fmt)
    return buf.getvalue()


def _row(row_key: str, status: str, **values) -> dict:
    row = {"row_key": row_key, "id": row_key.rsplit(":", 1)[-1], "status": status, "source_shard": "part-0.parquet",
           "kb_version": "kb1", "config_hash": "h1", **{f"seconds_{s}": 0.0 for s in STAGES}}
    return {**row, **values}


def _rows() -> pa.Table:
    return pa.Table.from_pylist([
        _row("part-0.parquet:0", "observed", image=_image("PNG"), text="a red square"),
        _row("part-0.parquet:1", "completed", image=_image("JPEG"), text="a generated caption", generated="text",
             generator="nn-consensus-retrieval", retrieved_ids=["e1", "e2"], fusion_scores=[0.75, 0.5],
             candidates=["c1", "c2"], candidate_ids=["e1", "e2"], candidate_scores=[0.25, float("nan")], chosen=0,
             settings=json.dumps({"alpha": 0.5, "source": "calibrated"}), seconds_embed=0.125,
             seconds_generate=float("nan")),
        _row("part-0.parquet:2", "completed", image=_image("PNG", (1, 2, 3)), text="words", generated="image",
             image_uri="s3://b/in.png"),
        _row("part-0.parquet:3", "failed", image=b"this is not an image", text="a caption kept in the json",
             error="image could not be decoded"),
        _row("part-0.parquet:4", "abstained", image=_image("PNG", (9, 9, 9)), generator="nn-consensus-retrieval",
             candidates=["an unsure caption"], candidate_ids=["e3"], candidate_scores=[0.5], chosen=0,
             confidence=0.25),
    ], schema=OUTPUT_SCHEMA)


def _members(payload: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(payload)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def test_tar_members_follow_img2dataset_layout_per_status():
    table = _rows()
    members = _members(output_tar(table))
    keys = [tar_key(k) for k in table.column("row_key").to_pylist()]
    assert len(set(keys)) == 5 and all(KEY.match(k) for k in keys)
    observed, text_done, image_done, failed, abstained = keys
    assert set(members) == {f"{observed}.png", f"{observed}.txt", f"{observed}.json",
                            f"{text_done}.jpg", f"{text_done}.txt", f"{text_done}.json",
                            f"{image_done}.png", f"{image_done}.txt", f"{image_done}.json",
                            f"{failed}.json",  # a failed row: only its json, never its undecodable bytes as .jpg
                            f"{abstained}.json"}  # an abstained row: no half pair for a loader to meet
    abstained_meta = json.loads(members[f"{abstained}.json"])
    assert (abstained_meta["status"], abstained_meta["confidence"]) == ("abstained", 0.25)
    assert abstained_meta["candidates"][abstained_meta["chosen"]] == "an unsure caption"
    assert members[f"{observed}.png"] == table.column("image")[0].as_py()
    assert members[f"{text_done}.txt"].decode() == "a generated caption"
    meta = json.loads(members[f"{text_done}.json"])
    assert meta["key"] == text_done and meta["row_key"] == "part-0.parquet:1" and meta["id"] == "1"
    assert "image" not in meta and "text" not in meta
    assert meta["status"] == "completed" and meta["generated"] == "text"
    assert meta["retrieved_ids"] == ["e1", "e2"] and meta["fusion_scores"] == [0.75, 0.5]
    assert meta["candidate_scores"] == [0.25, None] and meta["seconds_generate"] is None  # NaN -> null
    assert json.loads(meta["settings"])["source"] == "calibrated" and meta["kb_version"] == "kb1"
    assert json.loads(members[f"{image_done}.json"])["image_uri"] == "s3://b/in.png"
    failed_meta = json.loads(members[f"{failed}.json"])
    assert failed_meta["status"] == "failed" and failed_meta["error"] == "image could not be decoded"
    assert failed_meta["text"] == "a caption kept in the json"
    assert output_tar(table) == output_tar(table)  # a retried write task rewrites the same bytes


def test_tar_reads_back_into_the_output_rows():
    table = _rows()
    back = read_tar(io.BytesIO(output_tar(table)))
    assert back.schema == OUTPUT_SCHEMA
    want = table.to_pylist()
    want[3]["image"] = None  # a failed row's input image is not kept (retry reads the input again)
    want[4]["image"] = None  # nor an abstained row's
    want[1]["candidate_scores"], want[1]["seconds_generate"] = [0.25, None], None
    assert back.to_pylist() == want
    slim = read_tar(io.BytesIO(output_tar(table)), ["row_key", "status"])
    assert slim.column_names == ["row_key", "status"] and slim.num_rows == 5
    assert read_tar(io.BytesIO(output_tar(OUTPUT_SCHEMA.empty_table()))).num_rows == 0


def test_keys_of_odd_row_keys_are_safe_distinct_and_stable():
    odd = ["a.b:1", "a_b:1", "a_b_1", "dir/sh ärd.tar:7", "x" * 300, "y" * 300 + ":1", "..", "ok-key_9"]
    keys = [tar_key(k) for k in odd]
    assert len(set(keys)) == len(odd)
    assert all(KEY.match(k) and len(k) <= 80 for k in keys)
    assert tar_key("ok-key_9") == "ok-key_9" and tar_key("a_b_1") == "a_b_1"  # already safe: unchanged
    assert tar_key("a.b:1").startswith("a_b_1_") and tar_key("a.b:1") == tar_key("a.b:1")
    table = pa.Table.from_pylist([_row(k, "observed", image=_image("PNG"), text=f"t{i}") for i, k in enumerate(odd)],
                                 schema=OUTPUT_SCHEMA)
    payload = output_tar(table)
    assert all("." not in name.split(".", 1)[0] for name in _members(payload))
    assert read_tar(io.BytesIO(payload)).column("row_key").to_pylist() == odd


def test_the_projects_webdataset_reader_reads_the_output_tars(tmp_path):
    """The tars are input to img2dataset-style readers, this project's included: id, image and text per row."""
    path = tmp_path / "out.tar"
    path.write_bytes(output_tar(_rows()))
    got = read_shard(str(path), format="webdataset").table
    assert got.column("id").to_pylist() == ["0", "1", "2", "3", "4"]
    assert got.column("text").to_pylist()[:3] == ["a red square", "a generated caption", "words"]
    assert got.column("image").to_pylist()[:3] == _rows().column("image").to_pylist()[:3]


def test_committed_tars_answer_resume_count_and_read_like_parquet(tmp_path):
    storage, out = Storage(), str(tmp_path / "out")
    table = _rows()
    keys = table.column("row_key").to_pylist()
    name = file_name(keys, "webdataset")
    assert name.endswith(".tar") and name[:-4] == file_name(keys)[:-8]  # the parquet file's name, as a tar
    path = f"{shard_dir(out, 'part-0.parquet')}/{name}"
    write_file(storage, table, path)
    write_file(storage, table, path)  # a retried write task: replaced in one piece
    assert [Path(p).name for p in Path(shard_dir(out, "part-0.parquet")).iterdir()] == [name]  # no temp files
    assert output_files(storage, out) == [path]
    assert committed_keys(storage, out, "part-0.parquet") == set(keys)
    assert committed_keys(storage, out, "part-1.parquet") == set()
    assert count_output_rows(storage, out) == 5
    assert read_output(storage, out, ["row_key", "status"]).column("status").to_pylist() == [
        "observed", "completed", "completed", "failed", "abstained"]


def test_the_config_flag_and_the_formats_agree():
    from rag4dmc.pipeline.cli import (
        COLUMN_FLAGS,
        JOB_FLAGS,
        OUTPUT_FLAGS,
        STORAGE_FLAGS,
        build_config,
        parser,
    )

    assert set(get_args(JobConfig.model_fields["output_format"].annotation)) == set(OUTPUT_FORMATS)
    args = parser().parse_args(["complete", "--data", "d", "--kb", "k", "--out", "o", "--output-format", "webdataset"])
    cfg = build_config(args, JobConfig, [JOB_FLAGS, OUTPUT_FLAGS, STORAGE_FLAGS, COLUMN_FLAGS])
    assert cfg.output_format == "webdataset" and JobConfig().output_format == "parquet"
    assert cfg.config_hash() == JobConfig().config_hash()  # the rows' config_hash (shared with serve) is unchanged
    with pytest.raises(SystemExit):
        parser().parse_args(["complete", "--data", "d", "--kb", "k", "--out", "o", "--output-format", "tar"])


def test_a_run_is_not_resumed_into_the_other_format(tmp_path):
    storage, out = Storage(), str(tmp_path / "out")
    tars = JobSpec(data="d", kb="k", out=out, cfg=JobConfig(output_format="webdataset"))
    _check_run(storage, tars, "kb1")
    assert json.loads((tmp_path / "out" / RUN_FILE).read_text())["output_format"] == "webdataset"
    with pytest.raises(RunMismatch, match="holds webdataset output.*--output-format webdataset"):
        _check_run(storage, JobSpec(data="d", kb="k", out=out), "kb1")
    _check_run(storage, tars, "kb1")  # the same format resumes
    old = tmp_path / "old"
    old.mkdir()
    run = {"config_hash": JobConfig().config_hash(), "kb_version": "kb1", "data": "d"}  # before the option
    (old / RUN_FILE).write_text(json.dumps(run))
    _check_run(storage, JobSpec(data="d", kb="k", out=str(old)), "kb1")
    with pytest.raises(RunMismatch, match="holds parquet output"):
        _check_run(storage, JobSpec(data="d", kb="k", out=str(old), cfg=JobConfig(output_format="webdataset")), "kb1")


def _parquet_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*.parquet") if p.is_file()]  # shard folders are named after input files


@pytest.mark.timeout(900)
def test_job_writes_webdataset_tars_resumes_from_them_and_refuses_parquet(kb, tmp_path):  # noqa: F811
    data, out = tmp_path / "data", tmp_path / "out"
    good = _incomplete(24, seed=11)
    write_split(good, data, 2)
    bad = pa.table({"id": ["bad-undecodable"], "image": pa.array([b"this is not an image"], pa.binary()),
                    "text": pa.array([None], pa.string())})
    write_parquet(bad, f"{data}/bad.parquet")
    n_in = good.num_rows + 1
    # no NIQE term: this tests the output's format, not how candidates are scored
    cfg = JOB.model_copy(update={"output_format": "webdataset", "selection": FLOW_SELECTION})
    spec = JobSpec(data=str(data), kb=kb, out=str(out), cfg=cfg)
    first = run_job(spec)
    storage = Storage()
    files = output_files(storage, str(out))
    assert files and all(f.endswith(".tar") for f in files) and not _parquet_files(out)
    assert first["rows_out"] == first["unique_row_keys"] == n_in == first["rows_this_run"]
    assert first["failed"] == 1 and first["completed"] >= 15

    rows = read_output(storage, str(out)).to_pandas()
    assert len(rows) == n_in and rows.row_key.is_unique
    assert set(rows.id) == set(good.column("id").to_pylist()) | {"bad-undecodable"}
    by_key = rows.set_index("row_key")
    for f in files:  # members per status, one key per row
        members = _members(Path(f).read_bytes())
        for name, payload in members.items():
            if name.endswith(".json"):
                meta = json.loads(payload)
                row = by_key.loc[meta["row_key"]]
                exts = {n.split(".", 1)[1] for n in members if n.split(".", 1)[0] == meta["key"]}
                assert KEY.match(meta["key"]) and meta["status"] == row.status
                if row.status == "failed":
                    assert exts == {"json"} and meta["error"]
                else:
                    assert exts in ({"png", "txt", "json"}, {"jpg", "txt", "json"}), exts
                    assert meta["generated"] == (row.generated if row.status == "completed" else None)
                    assert meta["kb_version"] and meta["config_hash"]
    done = rows[rows.status == "completed"]
    assert set(done.generated) == {"text", "image"} and done.text.str.len().min() > 0
    assert all(Image.open(io.BytesIO(b)).size[0] > 0 for b in done[done.generated == "image"].image)

    # resume: a run killed after some commits (here: one committed tar lost and no summary) redoes only the
    # rows that are not committed; every committed tar stays as it was
    lost = max(files, key=lambda f: len(_members(Path(f).read_bytes())))
    lost_rows = sum(n.endswith(".json") for n in _members(Path(lost).read_bytes()))
    kept = {f: Path(f).read_bytes() for f in files if f != lost}
    Path(lost).unlink()
    (out / SUMMARY_FILE).unlink()
    resumed = run_job(spec)
    assert resumed["rows_this_run"] == lost_rows and resumed["rows_out"] == resumed["unique_row_keys"] == n_in
    assert all(Path(f).read_bytes() == payload for f, payload in kept.items())
    assert set(read_output(storage, str(out), ["row_key"]).column("row_key").to_pylist()) == set(rows.row_key)
    assert run_job(spec)["rows_out"] == n_in  # finished: nothing to do

    # --retry-failed swaps the recomputed failed row into the tars, once (the undecodable image fails again)
    retried = run_job(JobSpec(**{**spec.__dict__, "retry_failed": True}))
    assert retried["rows_out"] == retried["unique_row_keys"] == n_in and retried["failed"] == 1
    after = output_files(storage, str(out))
    assert all(f.endswith(".tar") for f in after) and any(Path(f).name.startswith("retry-") for f in after)

    with pytest.raises(RunMismatch, match="holds webdataset output"):
        run_job(JobSpec(data=str(data), kb=kb, out=str(out), cfg=cfg.model_copy(update={"output_format": "parquet"})))
    assert count_output_rows(storage, str(out)) == n_in and not _parquet_files(out)
