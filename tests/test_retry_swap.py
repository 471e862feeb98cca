"""The ``--retry-failed`` swap under a crash at every step, and ``rag4dmc verify`` on planted damage, without Ray: an
output of two input shards is planted as the job writes it (one file per block, some rows failed), the retry's
recomputed rows are planted in its staging, and each fault point of the swap (``rag4dmc.actors.faults`` stage
``swap``) stops it there; the next command on the output rolls it forward, and every row is then there once."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pytest

from rag4dmc.actors import faults
from rag4dmc.pipeline.io.datasets import write_parquet
from rag4dmc.pipeline.io.storage import Storage
from rag4dmc.pipeline.job import retry_swap
from rag4dmc.pipeline.job.reader import row_key
from rag4dmc.pipeline.job.verify import verify
from rag4dmc.pipeline.job.writer import read_output, shard_dir, write_file
from rag4dmc.pipeline.schema import OUTPUT_SCHEMA

SHARDS, ROWS, BLOCK = ("a.parquet", "b.parquet"), 12, 4
FAILED = {row_key("a.parquet", 1), row_key("a.parquet", 6), row_key("b.parquet", 11)}
RUN = {"kb_version": "kb-1", "config_hash": "cfg-1"}


def _rows(shard: str, rows: range, status=lambda k: "failed" if k in FAILED else "completed") -> pa.Table:
    keys = [row_key(shard, i) for i in rows]
    n = len(keys)
    data = {f.name: pa.nulls(n, f.type) for f in OUTPUT_SCHEMA}
    data.update(row_key=pa.array(keys), id=pa.array(keys), status=pa.array([status(k) for k in keys]),
                source_shard=pa.array([shard] * n), kb_version=pa.array([RUN["kb_version"]] * n),
                config_hash=pa.array([RUN["config_hash"]] * n))
    return pa.table(data, schema=OUTPUT_SCHEMA)


def _plant(tmp_path, storage: Storage, out: str) -> str:
    """Input shards, the first run's output (a file per block) and the retry's staged rows; returns --data."""
    data = f"{tmp_path}/data"
    for shard in SHARDS:
        write_parquet(pa.table({"id": [f"{shard}-{i}" for i in range(ROWS)], "text": ["t"] * ROWS}),
                      f"{data}/{shard}")
        for start in range(0, ROWS, BLOCK):
            write_file(storage, _rows(shard, range(start, start + BLOCK)), f"{shard_dir(out, shard)}/part-{start}.parquet")
    storage.write_bytes(f"{out}/run.json", json.dumps(RUN).encode())
    staging = retry_swap.staging_dir(out)
    for shard in SHARDS:
        redo = [int(k.rsplit(":", 1)[1]) for k in sorted(FAILED) if k.startswith(shard)]
        table = _rows(shard, range(0), lambda k: "completed")
        table = pa.concat_tables([table] + [_rows(shard, range(i, i + 1), lambda k: "completed") for i in redo])
        write_file(storage, table, f"{shard_dir(staging, shard)}/block-0.parquet")
    return data


def _exactly_once(storage: Storage, out: str) -> None:
    table = read_output(storage, out, ["row_key", "status"]).to_pylist()
    keys = [r["row_key"] for r in table]
    assert sorted(keys) == sorted(row_key(s, i) for s in SHARDS for i in range(ROWS))  # every row, once
    assert all(r["status"] == "completed" for r in table)  # the failed copies are gone


STEPS = 1 + 2 + 3 + 1  # the record, two moves, three old files rewritten (a:1, a:6 and b:11's blocks), done


@pytest.mark.parametrize("step", range(1, STEPS + 1))
def test_a_swap_stopped_at_any_step_is_rolled_forward_by_the_next_command(tmp_path, monkeypatch, step):
    storage, out = Storage(), f"{tmp_path}/out"
    data = _plant(tmp_path, storage, out)
    monkeypatch.setenv(faults.ENV, json.dumps([{"stage": "swap", "kind": "permanent", "batch": step}]))
    with pytest.raises(faults.InjectedFault):
        retry_swap.swap_in(storage, out, list(SHARDS))
    monkeypatch.delenv(faults.ENV)
    before = verify(data, out, storage)
    if step < STEPS:  # stopped before the record was removed: verify says so, and what to do
        assert before.unfinished_swap and not before.ok and "run the same" in before.problems[0]
    assert retry_swap.recover(storage, out) == ("rolled forward" if step < STEPS else None)
    _exactly_once(storage, out)
    after = verify(data, out, storage)
    assert after.ok and after.statuses == {"completed": 2 * ROWS}, after.problems
    assert retry_swap.recover(storage, out) is None  # nothing left to do


def test_a_swap_into_a_relative_out_folder_keeps_the_rows_it_moved_in(tmp_path, monkeypatch):
    """``--out out`` (relative): the file system lists the output by absolute paths; the swap must still know the
    files it moved in from the old ones, or it would drop the recomputed rows with their failed copies."""
    monkeypatch.chdir(tmp_path)
    storage = Storage()
    data = _plant(tmp_path, storage, "out")
    assert retry_swap.swap_in(storage, "out", list(SHARDS)) == len(FAILED)
    _exactly_once(storage, "out")
    assert verify(data, "out", storage).ok


def test_a_retry_stopped_before_its_swap_is_rolled_back(tmp_path):
    storage, out = Storage(), f"{tmp_path}/out"
    data = _plant(tmp_path, storage, out)  # staged rows, no record: the swap never began
    assert "never reached its swap" in verify(data, out, storage).unfinished_swap
    assert retry_swap.recover(storage, out) == "rolled back"
    report = verify(data, out, storage)
    assert report.ok and report.statuses == {"completed": 2 * ROWS - 3, "failed": 3}  # the failed rows, to retry


def test_verify_finds_a_lost_row_a_duplicate_a_foreign_row_and_another_runs_rows(tmp_path):
    storage, out = Storage(), f"{tmp_path}/out"
    data = _plant(tmp_path, storage, out)
    retry_swap.recover(storage, out)
    assert verify(data, out, storage).ok
    lost = f"{shard_dir(out, 'b.parquet')}/part-8.parquet"
    storage.remove(lost)  # rows b:8..11 lost
    write_file(storage, _rows("a.parquet", range(0, 2)), f"{shard_dir(out, 'a.parquet')}/again.parquet")  # a:0-1 twice
    write_file(storage, _rows("c.parquet", range(0, 1)), f"{shard_dir(out, 'c.parquet')}/x.parquet")  # no such input
    other = _rows("a.parquet", range(20, 21)).set_column(OUTPUT_SCHEMA.get_field_index("kb_version"), "kb_version",
                                                          pa.array(["kb-0"]))
    write_file(storage, other, f"{shard_dir(out, 'a.parquet')}/old.parquet")
    report = verify(data, out, storage)
    assert not report.ok
    assert report.lost == 4 and report.lost_keys == sorted(row_key("b.parquet", i) for i in range(8, 12))
    assert report.duplicated == 2 and report.duplicated_keys == [row_key("a.parquet", 0), row_key("a.parquet", 1)]
    assert report.unexpected == 2  # c:0, and a:20 (shard a has 12 rows)
    assert any("kb_version: 1 rows have ['kb-0']" in m for m in report.run_mismatch)


def test_rag4dmc_verify_exits_non_zero_on_damage_and_prints_the_report(tmp_path):
    storage, out = Storage(), f"{tmp_path}/out"
    data = _plant(tmp_path, storage, out)
    cmd = [sys.executable, "-m", "rag4dmc.pipeline.cli", "verify", "--data", data, "--out", out]
    unfinished = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert unfinished.returncode == 1 and json.loads(unfinished.stdout)["unfinished_swap"]
    retry_swap.recover(storage, out)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["ok"] is True


def test_verify_and_recovery_on_object_storage(tmp_path, s3_bucket, s3_server):
    storage = Storage(s3_server.storage_config)
    local_out = f"{tmp_path}/out"
    data = _plant(tmp_path, Storage(), local_out)
    s3 = storage.fs(s3_bucket)
    bucket = s3_bucket.split("://")[1]
    s3.put(f"{local_out}/", f"{bucket}/out", recursive=True)
    s3.put(f"{data}/", f"{bucket}/data", recursive=True)
    report = verify(f"{s3_bucket}/data", f"{s3_bucket}/out", storage)
    assert report.unfinished_swap and report.input_rows == 2 * ROWS and report.lost == 0
    assert retry_swap.recover(storage, f"{s3_bucket}/out") == "rolled back"  # staged rows, no record
    assert verify(f"{s3_bucket}/data", f"{s3_bucket}/out", storage).ok


def test_a_swap_process_killed_with_sigkill_mid_swap_is_rolled_forward(tmp_path):
    """The swap in a process of its own (a session of its own), SIGKILLed with its process group after its first
    move (a ``kill_job`` fault: the power cut of a preempted driver); the next command rolls it forward."""
    import os
    import signal

    from tests.conftest import REPO_ROOT

    storage, out = Storage(), f"{tmp_path}/out"
    data = _plant(tmp_path, storage, out)
    code = ("from rag4dmc.pipeline.io.storage import Storage\nfrom rag4dmc.pipeline.job import retry_swap\n"
            f"retry_swap.swap_in(Storage(), {out!r}, {list(SHARDS)!r})\n")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT),
           faults.ENV: json.dumps([{"stage": "swap", "kind": "kill_job", "batch": 2}])}
    killed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                            start_new_session=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    report = verify(data, out, storage)
    assert report.unfinished_swap and report.duplicated == 2  # the moved file (a:1, a:6) beside their failed copies
    assert retry_swap.recover(storage, out) == "rolled forward"
    _exactly_once(storage, out)
    assert verify(data, out, storage).ok
