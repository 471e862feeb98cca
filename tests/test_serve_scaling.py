"""`rag4dmc serve` on a simulated three-node cluster scales a deployment past one replica under load
(``tests/serve_cluster.py``, in a process of its own): ``compose`` sizes each deployment's most replicas from the
cluster's CPUs, and Serve's autoscaler starts more than one replica of a deployment while 16 clients post
completions; every request is answered 200, or 503 with Retry-After (overload), never another error; Ctrl-C then
stops the server within 10 s."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.serve_cluster import WORKER, WORKERS


@pytest.mark.timeout(1600)
def test_rag4dmc_serve_on_a_cluster_scales_a_deployment_past_one_replica_under_load(kb, tmp_path):
    result_file = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "tests.serve_cluster", str(tmp_path), str(result_file), kb],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=1500)
    finally:
        if proc.poll() is None:  # past the timeout: its cluster's processes go with it
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=60)
    result = json.loads(result_file.read_text()) if result_file.exists() else {}
    assert proc.returncode == 0, (result.get("error"), result.get("serve_log_tail"), output[-6000:])

    assert sorted(result["nodes"]) == sorted([2] + [WORKER["num_cpus"]] * WORKERS)
    bounds, peak = result["bounds"], result["peak_running"]
    # sized from the cluster: some deployment may grow past one replica, and under load one did
    scaled = [d for d, b in bounds.items() if b["max_replicas"] > 1 and peak.get(d, 0) > 1]
    assert scaled, (bounds, peak, result["statuses"])
    for d, b in bounds.items():
        assert b["min_replicas"] == 1 and peak.get(d, 0) <= b["max_replicas"], (d, b, peak)
    # every request answered: 200, or 503 with Retry-After under overload; no other 5xx, no 4xx, no hang
    assert result["requests"] > 0 and set(result["statuses"]) <= {"200", "503"}, (result["statuses"],
                                                                                  result["failures"])
    assert result["statuses"].get("200", 0) > 0 and result["refused_without_retry_after"] == 0
    # Ctrl-C (SIGINT) stops it within 10 s with exit 0 (the cluster's processes stay: it did not start them)
    assert result["serve_exit"] == 0 and result.get("seconds_to_stop", float("inf")) <= 10, result["serve_log_tail"]
