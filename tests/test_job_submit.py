"""``ray job submit`` of ``rag4dmc kb build`` and ``rag4dmc complete`` to a running cluster, as README's "On a cluster"
says to: a head started here with ``ray start --head`` (its own ports and temp dir, so it meets no other Ray on the
machine), both commands submitted through its dashboard with the documented entrypoint and runtime environment,
and every input row out exactly once.

The head runs from this virtual environment (its ``bin`` first on ``PATH``, as an activated one would be), where
rag4dmc is installed and ``rag4dmc setup`` has run: that is what each node must have. It is started without the
test's offline settings, so the job gets them only from ``--runtime-env-json``; it gets no ``--working-dir``. Its
``PYTHONPATH`` names this checkout only because the shared venv's editable install may point at another clone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from rag4dmc.pipeline.demo.corpus import write_split
from rag4dmc.pipeline.io.storage import Storage
from rag4dmc.pipeline.job.writer import read_output
from tests.conftest import LOOPBACK, RAY_NUM_CPUS, RAY_OBJECT_STORE_BYTES, REPO_ROOT
from tests.processes import processes_with_env, until
from tests.test_job import FAST_KB, _incomplete, write_kb_sources

BIN = Path(sys.executable).parent  # the virtual environment's ray and rag4dmc
# What README's "On a cluster" passes as --runtime-env-json: the job's settings, nothing about where the code is.
RUNTIME_ENV = {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}
# Settings of this test session that the head must not inherit: the job gets them from RUNTIME_ENV.
NOT_ON_THE_NODE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM", "RAY_ADDRESS")
MARKER = "RAG4DMC_TEST_RAY_HEAD"  # in the head's environment, so every process it starts can be found and ended
# Ray turns token authentication on for `ray start` when ~/.ray/auth_token exists, which any local ray.init() on the
# machine writes: the head gets a token of its own instead, and the clients here present it.
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex}
AUTH_HEADER = {"Authorization": f"Bearer {AUTH['RAY_AUTH_TOKEN']}"}
HEAD_START_TIMEOUT_S = 300  # the dashboard's job API answered in 6 s on an idle machine, 75 s on a loaded one
JOB_TIMEOUT_S = 600
SUBMITTED_ROWS = 32  # the submitted complete's input, in 2 shards: what is tested is the submission, not the scale


@dataclass(frozen=True)
class Head:
    dashboard: str  # http://127.0.0.1:<port>, the address `ray job submit` takes
    temp_dir: Path

    def client(self):
        """A job-submission client of this head, with its token."""
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard, headers=AUTH_HEADER)


def _head_logs(temp_dir: Path) -> str:
    """The ends of the head's start log and its dashboard's logs, for a failure message."""
    logs = [temp_dir / "ray-start.log", *sorted(temp_dir.glob("session_latest/logs/dashboard*.log"))]
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in logs if p.is_file())


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on this machine now (held together while they are picked)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _jobs_api_answers(url: str) -> bool:
    request = urllib.request.Request(f"{url}/api/jobs/", headers=AUTH_HEADER)
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


def _end_head(proc: subprocess.Popen, marker_value: str) -> None:
    """Stop this head and only it: SIGTERM to ``ray start --block`` (which then stops the processes it started),
    SIGKILL to its process group if it lingers, then to every process still carrying the marker (workers, the job
    supervisor and its entrypoint run in sessions of their own)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    for pid in processes_with_env(MARKER, marker_value):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    until(lambda: not processes_with_env(MARKER, marker_value), 30, "the head's processes to end",
          detail=lambda: f"still running: {processes_with_env(MARKER, marker_value)}")


@pytest.fixture(scope="module")
def ray_head() -> Iterator[Head]:
    """A Ray head of its own (``ray start --head --block`` in a session of its own, free ports, a fresh temp dir)."""
    temp_dir = tempfile.mkdtemp(prefix="r4d-head-", dir="/tmp")  # short: Ray's socket paths live under it
    gcs, dashboard, client_server, agent = _free_ports(4)
    env = {k: v for k, v in os.environ.items() if k not in NOT_ON_THE_NODE}
    # The venv is shared by clones and its editable install points at one of them: the node imports this checkout.
    pythonpath = [str(REPO_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env.update(PATH=os.pathsep.join([str(BIN), env.get("PATH", "")]),
               PYTHONPATH=os.pathsep.join(dict.fromkeys(pythonpath)), **AUTH, **{MARKER: temp_dir},
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="5")  # the jobs are over at teardown: not Ray's 30 s of draining
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}",
           "--include-dashboard=true", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client_server}",
           f"--dashboard-agent-listen-port={agent}", f"--num-cpus={RAY_NUM_CPUS}",
           f"--object-store-memory={RAY_OBJECT_STORE_BYTES}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    with open(Path(temp_dir) / "ray-start.log", "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://{LOOPBACK}:{dashboard}"
        until(lambda: proc.poll() is not None or _jobs_api_answers(url), HEAD_START_TIMEOUT_S,
              "the head's job API", interval_s=1, detail=lambda: _head_logs(Path(temp_dir)))
        assert proc.poll() is None, f"ray start exited {proc.returncode}:\n{_head_logs(Path(temp_dir))}"
        yield Head(url, Path(temp_dir))
    finally:
        _end_head(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(head: Head, entrypoint: list[str]) -> None:
    """``ray job submit`` as README's "On a cluster" has it; waits for the job and fails unless it SUCCEEDED."""
    from ray.job_submission import JobStatus

    job_id = f"rag4dmc-test-{uuid.uuid4().hex[:8]}"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", head.dashboard, "--submission-id", job_id,
           "--runtime-env-json", json.dumps(RUNTIME_ENV), "--", *entrypoint]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, env={**os.environ, **AUTH})
    except subprocess.TimeoutExpired:
        head.client().stop_job(job_id)
        raise
    status = head.client().get_job_status(job_id)
    assert done.returncode == 0 and status == JobStatus.SUCCEEDED, (
        f"{' '.join(entrypoint)}: ray job submit exited {done.returncode}, job {status}\n"
        f"{done.stdout[-5000:]}\n{done.stderr[-2000:]}\n{_head_logs(head.temp_dir)}")


@pytest.mark.timeout(2 * JOB_TIMEOUT_S + HEAD_START_TIMEOUT_S)
def test_kb_build_and_complete_submitted_to_a_running_cluster(ray_head, tmp_path):
    internal, external = write_kb_sources(tmp_path)
    kb_config = tmp_path / "kb.yaml"  # the module's fast KB settings (no calibration) as a --config file
    kb_config.write_text(yaml.safe_dump(FAST_KB.model_dump(mode="json", exclude_defaults=True)))
    kb = str(tmp_path / "kb")
    submit(ray_head, ["rag4dmc", "kb", "build", "--internal", internal, "--external", external, "--out", kb,
                      "--config", str(kb_config)])

    data, out = tmp_path / "data", tmp_path / "out"
    rows = _incomplete(SUBMITTED_ROWS, seed=6)
    write_split(rows, data, 2)
    submit(ray_head, ["rag4dmc", "complete", "--data", str(data), "--kb", kb, "--out", str(out)])

    table = read_output(Storage(), str(out)).to_pandas()
    assert len(table) == rows.num_rows and table.row_key.is_unique
    assert sorted(table.id) == sorted(rows.column("id").to_pylist())  # every input row, once
    assert set(table.status) <= {"observed", "completed"} and (table.status == "completed").sum() > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows_out"] == summary["unique_row_keys"] == rows.num_rows
    assert summary["observed"] + summary["completed"] == rows.num_rows and summary["failed"] == 0
