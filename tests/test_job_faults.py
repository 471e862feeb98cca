"""Faults through the whole job on local Ray (2 CPUs), each injected deterministically (``rag4dmc.actors.faults``):
every input row comes out exactly once, completed or failed with the reason.

A fault inside the job (an actor's process exits, a transient error, a poison row, a hung batch) runs the job
on the session's Ray cluster: the job hands the fault plan to its workers in their runtime environment. A kill
of the whole job runs ``rag4dmc complete`` in a process (and a session) of its own, a driver joining the
session's cluster, so the kill takes nothing else with it. Timeouts only guard against hangs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from rag4dmc.actors import faults
from rag4dmc.pipeline.demo.corpus import write_split
from rag4dmc.pipeline.io.storage import Storage
from rag4dmc.pipeline.job.runner import read_output
from tests.test_job import REPO, _incomplete

N, SHARDS = 48, 3
# small blocks and batches: every stage sees several batches, so "batch 2" lands mid-job. No NIQE term: these jobs
# test where rows go when something fails, not how candidates are scored (NIQE loads pyiqa and torchvision in the
# image generator and scores every candidate: the slowest stage here; tests/test_job.py's jobs keep it)
CONFIG = {"block_rows": 8, "resources": {s: {"batch_size": 8} for s in ("embed", "retrieve", "generate")},
          "selection": {"image_quality": "none"}}


def _data(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    if not data.exists():
        write_split(_incomplete(N, seed=7), data, SHARDS)
    return data


def _run(kb: str, tmp_path: Path, plan: list[dict], monkeypatch, config: dict | None = None,
         state: str = "faults") -> tuple[dict, Path, Path]:
    """The job in this process, on the session's cluster, with the fault ``plan`` set (its state in the folder
    ``state``: a plan of its own needs a folder of its own); its summary, output and the faults' state folder."""
    from rag4dmc.pipeline.config import JobConfig
    from rag4dmc.pipeline.job.runner import JobSpec, run_job

    out, state = tmp_path / "out", tmp_path / state
    monkeypatch.setenv(faults.ENV, json.dumps({"dir": str(state), "faults": plan}))
    cfg = JobConfig.model_validate({**CONFIG, **(config or {})})
    return run_job(JobSpec(data=str(_data(tmp_path)), kb=kb, out=str(out), cfg=cfg)), out, state


def _start(kb: str, tmp_path: Path, plan: list[dict], state: Path, *flags: str) -> subprocess.Popen:
    """``rag4dmc complete`` in a process and session of its own, with the fault ``plan``, as a driver joining the
    session's Ray cluster (``RAY_ADDRESS``), as a job's driver joins a running cluster: a kill of its process
    group kills that driver alone, and Ray ends its actors and tasks."""
    import ray

    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
           "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           faults.ENV: json.dumps({"dir": str(state), "faults": plan})}
    cmd = [sys.executable, "-m", "rag4dmc.pipeline.cli", "complete", "--data", str(_data(tmp_path)), "--kb", kb,
           "--out", str(tmp_path / "out"), "--config", str(cfg), *flags]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _wait(proc: subprocess.Popen, timeout: float = 540) -> str:
    """The process's output once it has ended; its process group killed if it is still running after ``timeout``."""
    try:
        log, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return log


def _rows(out: Path) -> dict[str, dict]:
    table = read_output(Storage(), str(out), ["row_key", "status", "error", "retries"])
    rows = table.to_pylist()
    keys = [r["row_key"] for r in rows]
    assert len(keys) == len(set(keys)), "a row came out twice"
    return {r["row_key"]: r for r in rows}


def _all_keys() -> set[str]:
    bounds = np.linspace(0, N, SHARDS + 1).astype(int)  # as write_split splits the rows
    return {f"part-{j:05d}.parquet:{i}" for j in range(SHARDS) for i in range(bounds[j + 1] - bounds[j])}


def _fired_fault(state: Path, index: int) -> int:
    """How often fault ``index`` of the plan fired (its marker files)."""
    return len(list(state.glob(f"fault-{index}-*")))


def _poison_row() -> str:
    """A row of shard 1 that the job embeds (an incomplete one)."""
    table = _incomplete(N, seed=7)
    first = int(np.linspace(0, N, SHARDS + 1).astype(int)[1])
    row = next(i for i in range(first, N) if table["image"][i].as_py() is None or table["text"][i].as_py() is None)
    return f"part-00001.parquet:{row - first}"


TIMEOUT_S = 15  # the job's batch_timeout_s here: past any real batch of 8 rows on 2 busy CPUs, short of the hang


@pytest.mark.timeout(900)
def test_faults_inside_a_job_each_cost_only_their_own_rows_and_every_row_comes_out_once(kb, tmp_path, monkeypatch):
    """Four faults planted in one job, each at its own place, each with its own outcome:

    * the embedding actor's process exits at its 2nd batch: the actor is restarted and the batch redone, no row fails;
    * a transient error at the 1st generation batch: retried, its rows complete and are counted as retried;
    * a poison row at embedding (fails on every call): it fails alone with the reason, its batch-mates complete;
    * the 3rd generation batch hangs: its rows fail after ``batch_timeout_s`` and the job finishes.
    """
    poison = _poison_row()
    plan = [{"stage": "embed", "kind": "exit", "batch": 2},
            {"stage": "generate", "kind": "transient", "batch": 1},
            {"stage": "embed", "kind": "permanent", "row_key": poison},
            {"stage": "generate", "kind": "hang", "batch": 3, "seconds": 3600}]
    summary, out, state = _run(kb, tmp_path, plan, monkeypatch, {"retry_backoff_s": 0.1, "batch_timeout_s": TIMEOUT_S})
    rows = _rows(out)
    assert set(rows) == _all_keys()  # every row once, whatever happened to it

    assert _fired_fault(state, 0) == 1  # the embedding actor's process did die (and its replacement did not)
    assert _fired_fault(state, 1) == 1
    retried = [k for k, r in rows.items() if r["retries"]]
    assert 0 < len(retried) <= 8 and summary["rows_retried"] == len(retried)
    assert all(rows[k]["status"] != "failed" for k in retried)

    assert rows[poison]["status"] == "failed" and "injected permanent fault in embed" in rows[poison]["error"]

    timed_out = [k for k, r in rows.items() if r["error"] == f"generate timed out after {TIMEOUT_S} s"]
    assert 0 < len(timed_out) <= 8

    failed = {k for k, r in rows.items() if r["status"] == "failed"}
    assert failed == {poison, *timed_out}  # nothing else failed: the exit's batch was redone, the transient retried


@pytest.mark.timeout(900)
def test_a_killed_job_resumes_and_a_retry_killed_mid_swap_is_rolled_forward(kb, tmp_path, monkeypatch):
    """Two kills of ``rag4dmc complete``, each a process of its own joining the session's cluster, as a job's
    driver joins a running cluster, each SIGKILLed with its process group:

    1. a job killed after two committed blocks (a ``kill_job`` fault at the commit); run again (in this process,
       with the first generation batch failing), it computes only the rows not yet committed;
    2. ``--retry-failed`` killed from outside in the middle of its swap, after the intent record and the first
       move (a ``hang`` planted at the swap's 2nd step holds it there until the kill). ``verify`` reports the
       half-done swap; the next run rolls it forward, and every row comes out exactly once, the retried ones
       completed.
    """
    from rag4dmc.pipeline.config import JobConfig
    from rag4dmc.pipeline.job.runner import JobSpec, run_job
    from rag4dmc.pipeline.job.verify import verify

    killed = _start(kb, tmp_path, [{"stage": "commit", "kind": "kill_job", "batch": 2}], tmp_path / "faults")
    log = _wait(killed)
    assert killed.returncode == -signal.SIGKILL, log[-3000:]
    out = tmp_path / "out"
    committed = set(_rows(out))
    assert 2 <= len(committed) < N  # the two blocks committed before the kill (and any committed beside them)
    summary, _, _ = _run(kb, tmp_path, [{"stage": "generate", "kind": "permanent", "batch": 1}], monkeypatch,
                         state="rerun-faults")
    rows = _rows(out)
    assert set(rows) == _all_keys()
    assert summary["rows_this_run"] == N - len(committed)  # the committed rows were not computed again
    assert json.loads((out / "summary.json").read_text())["rows_this_run"] == summary["rows_this_run"]
    failed = {k for k, r in rows.items() if r["status"] == "failed"}
    assert 0 < len(failed) <= 8 and summary["failed"] == len(failed) and not failed & committed

    state = tmp_path / "swap-faults"
    retry = _start(kb, tmp_path, [{"stage": "swap", "kind": "hang", "batch": 2, "seconds": 3600}], state,
                   "--retry-failed")
    try:
        for _ in range(5400):  # the hang's marker: the retry is inside its swap, holding still
            if _fired_fault(state, 0) or retry.poll() is not None:
                break
            time.sleep(0.1)
        assert _fired_fault(state, 0) == 1, "the retry never reached its swap"
        os.killpg(retry.pid, signal.SIGKILL)
    finally:
        log = _wait(retry, timeout=60)
    assert retry.returncode == -signal.SIGKILL, log[-3000:]

    data = str(_data(tmp_path))
    half_done = verify(data, str(out), Storage())
    assert not half_done.ok and "records a swap not finished" in half_done.unfinished_swap
    assert "run the same" in half_done.problems[0]

    monkeypatch.delenv(faults.ENV)
    again = run_job(JobSpec(data=data, kb=kb, out=str(out), cfg=JobConfig.model_validate(CONFIG), retry_failed=True))
    rows = _rows(out)
    assert set(rows) == _all_keys() and again["failed"] == 0
    assert all(rows[k]["status"] == "completed" for k in failed)
    report = verify(data, str(out), Storage())
    assert report.ok and "failed" not in report.statuses and sum(report.statuses.values()) == N, report.problems


def test_an_output_bucket_that_does_not_exist_fails_before_any_actor_starts(kb, s3_server, monkeypatch):
    import s3fs

    from rag4dmc.pipeline.config import JobConfig
    from rag4dmc.pipeline.job import runner as job

    def no_plan(*args, **kwargs):
        raise AssertionError("the job planned actors for an output it cannot write")

    monkeypatch.setattr(job, "write", no_plan)
    cfg = JobConfig(storage=s3_server.storage_config)
    with pytest.raises(job.OutputNotWritable, match="cannot write to --out s3://no-such-bucket-7f3a/out"):
        job.run_job(job.JobSpec(data="unused", kb=kb, out="s3://no-such-bucket-7f3a/out", cfg=cfg))
    assert not s3fs.S3FileSystem(**s3_server.storage_options).exists("no-such-bucket-7f3a")


@pytest.mark.timeout(900)
def test_an_output_prefix_these_credentials_may_not_write_fails_before_any_actor_starts(kb, s3_bucket, s3_server,
                                                                                        monkeypatch):
    """A read-only grant (403 AccessDenied on writes under --out, behind the proxy): refused in preflight with
    the URI, before any actor is planned, and nothing is written."""
    from rag4dmc.pipeline.config import JobConfig
    from rag4dmc.pipeline.job import runner as job
    from tests.faulty_s3 import FaultyProxy

    def no_plan(*args, **kwargs):
        raise AssertionError("the job planned actors for an output it cannot write")

    monkeypatch.setattr(job, "write", no_plan)
    out = f"{s3_bucket}/denied/out"
    with FaultyProxy(s3_server.endpoint_url, every=10**9, deny_writes=f"/{out.split('://')[1].split('/')[0]}/denied"
                     ) as proxy:
        cfg = JobConfig(storage=s3_server.storage_config.model_copy(update={"endpoint_url": proxy.url}))
        with pytest.raises(job.OutputNotWritable, match=f"cannot write to --out {out} .*AccessDenied|"
                           f"cannot write to --out {out} .*PermissionError"):
            job.run_job(job.JobSpec(data="unused", kb=kb, out=out, cfg=cfg))
    assert proxy.injected["403"] >= 1
    assert not Storage(s3_server.storage_config).fs(out).find(out.split("://")[1])  # no half-written run


@pytest.mark.timeout(120)
def test_object_storage_retries_are_logged_as_warnings(s3_bucket, s3_server, caplog):
    """botocore decides the retries and logs them at DEBUG; they reach the job's logs as warnings, and nothing
    else of botocore's per-request chatter does."""
    import logging

    from tests.faulty_s3 import FaultyProxy

    with FaultyProxy(s3_server.endpoint_url, every=2, kinds=("503",)) as proxy, caplog.at_level(logging.DEBUG):
        store = Storage(s3_server.storage_config.model_copy(update={"endpoint_url": proxy.url, "retries": 5}))
        for i in range(4):
            store.write_bytes(f"{s3_bucket}/retried/{i}.bin", b"x" * 100)
        assert [store.read_bytes(f"{s3_bucket}/retried/{i}.bin") for i in range(4)] == [b"x" * 100] * 4
    assert proxy.injected["503"] > 0
    retries = [r for r in caplog.records if r.name == "rag4dmc.pipeline.io.storage" and "retry" in r.getMessage().lower()]
    assert retries and all(r.levelno == logging.WARNING for r in retries)
    assert len(retries) == proxy.injected["503"]  # one warning per injected error, each retried
    assert not [r for r in caplog.records if r.name == "botocore.retries.standard"]


@pytest.mark.timeout(900)
def test_object_storage_errors_and_resets_are_retried_and_every_row_comes_out_once(kb, s3_bucket, s3_server,
                                                                                   tmp_path):
    """Input, KB and output on S3 behind a proxy that answers every 5th request with 500, 503 SlowDown or a
    connection reset: the job completes every row exactly once (botocore retries them: storage.retries)."""
    from rag4dmc.pipeline.config import JobConfig
    from rag4dmc.pipeline.job.runner import JobSpec, run_job
    from tests.faulty_s3 import FaultyProxy

    direct = Storage(s3_server.storage_config)
    data, kb_uri, out = f"{s3_bucket}/incomplete", f"{s3_bucket}/kb", f"{s3_bucket}/out"
    write_split(_incomplete(N, seed=7), data, SHARDS, storage_options=s3_server.storage_options)
    direct.fs(kb_uri).put(kb.rstrip("/") + "/", kb_uri.split("://")[1], recursive=True)
    with FaultyProxy(s3_server.endpoint_url, every=5) as proxy:
        cfg = JobConfig(storage=s3_server.storage_config.model_copy(update={"endpoint_url": proxy.url,
                                                                              "retries": 5}))
        summary = run_job(JobSpec(data=data, kb=kb_uri, out=out, cfg=cfg))
    assert all(proxy.injected[k] > 0 for k in ("500", "503", "reset")), proxy.injected
    assert summary["rows_out"] == summary["unique_row_keys"] == N
    assert direct.exists(f"{out}/summary.json") and direct.exists(f"{out}/run.json")
    table = read_output(direct, out, ["row_key", "status"])
    keys = table.column("row_key").to_pylist()
    assert len(keys) == len(set(keys)) == N and set(keys) == _all_keys()
    assert "failed" not in table.column("status").to_pylist()
