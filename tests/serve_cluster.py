"""`rag4dmc serve` on a simulated three-node cluster, under load, until Serve scales a deployment past one replica
(``tests/test_serve_scaling.py`` runs this file in a process of its own: a Ray driver connects to one cluster at a
time, and the suite's session has its own).

    python -m tests.serve_cluster WORKDIR RESULT.json KB

The cluster is ``ray.cluster_utils.Cluster``: a 2-CPU head and two workers of 4 logical CPUs (no GPUs). On it this
process serves the KB it is given (the session's small job KB): ``python -m rag4dmc.pipeline.cli serve`` (the
command an operator runs) with ``RAY_ADDRESS`` set to the cluster, so ``run_local`` connects to it and ``compose`` sizes each deployment's replicas
from its 10 CPUs. Once /healthz answers, ``CLIENTS`` threads post completions to 127.0.0.1 (at most ``MAX_REQUESTS``
or ``LOAD_S`` seconds) while ``serve.status()`` is polled; the load stops once a deployment has more than one
RUNNING replica. The service is then stopped with SIGINT, as Ctrl-C stops it. What was seen goes to RESULT.json:
each deployment's autoscaling bounds as deployed, its peak RUNNING replicas, and every request's status.

Two settings change from the defaults. ``resources.<embed|generate>.batch_size`` = ``BATCH``: Serve's
autoscaling target per replica is the deployment's batch size (``rag4dmc.deploy.app.deployment_options``), 64 by default,
which a handful of clients never reaches; with a batch of 2 the target is 2 requests in flight per replica. And
``upscale_delay_s`` = ``UPSCALE_DELAY_S`` instead of Serve's 30 s, which the test would otherwise wait out.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
HEAD = {"num_cpus": 2, "num_gpus": 0}
WORKER = {"num_cpus": 4, "num_gpus": 0}
WORKERS = 2
OBJECT_STORE_BYTES = 200 * 1024**2  # per node; the requests are small
BATCH = 2  # the Encoder's and the generators' batch, so their autoscaling target (requests per replica)
UPSCALE_DELAY_S = 3.0  # Serve adds a replica after 3 s above target, not its default 30 s
CLIENTS = 16
MAX_REQUESTS = 5000
LOAD_S = 330.0  # the load stops here at the latest, scaled or not (Serve decides an upscale after 30 s)
HEALTH_TIMEOUT_S = 420.0
HTTP_TIMEOUT_S = 120.0
POLL_S = 1.0


def start_cluster():
    from bench.common import start_cluster as local_cluster

    return local_cluster(HEAD, [WORKER] * WORKERS, OBJECT_STORE_BYTES)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def request_bodies(n: int) -> list[dict]:
    """Distinct requests, texts and images alternating (both generators and both encoder towers see work)."""
    from rag4dmc.pipeline.demo.corpus import make_internal

    table = make_internal(n, seed=21)
    images, texts = table.column("image").to_pylist(), table.column("text").to_pylist()
    out = []
    for i, (image, text) in enumerate(zip(images, texts)):
        out.append({"text": text, "id": f"load-txt-{i}"} if i % 2 else
                   {"image": base64.b64encode(image).decode(), "id": f"load-img-{i}"})
    return out


class Load:
    """``CLIENTS`` threads posting completions until ``stop`` is set, ``LOAD_S`` has passed or ``MAX_REQUESTS`` were
    sent. A 503 is retried after its Retry-After, as a client should; every answer is recorded."""

    def __init__(self, url: str, bodies: list[dict]):
        self.url, self.bodies = url, bodies
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.sent = 0
        self.statuses: Counter[str] = Counter()
        self.refused_without_retry_after = 0
        self.failures: list[str] = []  # a 5xx other than 503, a 4xx, or no answer: what it said
        self.deadline = time.monotonic() + LOAD_S

    def _next(self) -> dict | None:
        with self.lock:
            if self.stop.is_set() or self.sent >= MAX_REQUESTS or time.monotonic() >= self.deadline:
                return None
            self.sent += 1
            return self.bodies[self.sent % len(self.bodies)]

    def client(self) -> None:
        import requests

        while (body := self._next()) is not None:
            try:
                r = requests.post(f"{self.url}/v1/complete", json=body, timeout=HTTP_TIMEOUT_S)
            except requests.RequestException as exc:
                with self.lock:
                    self.statuses["no answer"] += 1
                    self.failures.append(repr(exc)[:300])
                continue
            with self.lock:
                self.statuses[str(r.status_code)] += 1
                if r.status_code == 503 and "Retry-After" not in r.headers:
                    self.refused_without_retry_after += 1
                if r.status_code not in (200, 503):
                    self.failures.append(f"{r.status_code}: {r.text[:300]}")
            if r.status_code == 503:
                self.stop.wait(float(r.headers.get("Retry-After", 1)))


def running_replicas(app_name: str) -> dict[str, int]:
    """Each deployment's RUNNING replicas, from ``serve.status()``."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return {}
    return {name: sum(n for state, n in d.replica_states.items() if getattr(state, "value", state) == "RUNNING")
            for name, d in app.deployments.items()}


def deployed_bounds(app_name: str) -> dict[str, dict]:
    """Each deployment's autoscaling config as the Serve controller holds it (what ``compose`` deployed)."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    deployments = details["applications"][app_name]["deployments"]
    return {name: {k: d["deployment_config"]["autoscaling_config"].get(k)
                   for k in ("min_replicas", "max_replicas", "target_ongoing_requests")}
            for name, d in deployments.items()}


def wait_healthy(proc: subprocess.Popen, url: str, log: Path) -> None:
    from bench.common import wait_healthy as wait

    wait(proc, url, log, HEALTH_TIMEOUT_S)


def serve_under_load(cluster_address: str, kb: str, work: Path, result: dict) -> None:
    from rag4dmc.deploy.app import APP_NAME

    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    config = work / "serve.yaml"
    config.write_text(yaml.safe_dump({"resources": {"embed": {"batch_size": BATCH}, "generate": {"batch_size": BATCH}},
                                      "request_timeout_s": HTTP_TIMEOUT_S, "upscale_delay_s": UPSCALE_DELAY_S}))
    log = work / "serve.log"
    cmd = [sys.executable, "-m", "rag4dmc.pipeline.cli", "serve", "--kb", kb, "--host", LOOPBACK, "--port", str(port),
           "--image-quality", "none", "--config", str(config)]
    with log.open("w") as out:
        # in this process's group: whoever kills the group (the test, past its timeout) ends the server too
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "RAY_ADDRESS": cluster_address}, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_healthy(proc, url, log)
        result["bounds"] = deployed_bounds(APP_NAME)
        peak = running_replicas(APP_NAME)
        load = Load(url, request_bodies(64))
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
            clients = [pool.submit(load.client) for _ in range(CLIENTS)]
            while not all(c.done() for c in clients):
                now = running_replicas(APP_NAME)
                peak = {d: max(n, peak.get(d, 0)) for d, n in now.items()}
                if any(n > 1 for n in now.values()) and "seconds_to_scale" not in result:
                    result["seconds_to_scale"] = round(time.monotonic() - started, 1)
                    result["replicas_when_scaled"] = now
                    load.stop.set()
                time.sleep(POLL_S)
            for c in clients:
                c.result()
        result.update(peak_running=peak, requests=load.sent, statuses=dict(load.statuses),
                      refused_without_retry_after=load.refused_without_retry_after, failures=load.failures[:20],
                      load_seconds=round(time.monotonic() - started, 1))
    finally:
        if proc.poll() is None:
            signalled = time.monotonic()
            proc.send_signal(signal.SIGINT)  # as Ctrl-C stops it: the app is deleted
            try:
                proc.wait(timeout=60)
                result["seconds_to_stop"] = round(time.monotonic() - signalled, 1)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        result["serve_exit"] = proc.returncode
        result["serve_log_tail"] = log.read_text()[-4000:]


def main(work: Path, result_file: Path, kb: str) -> None:
    import ray

    result: dict = {}
    cluster = start_cluster()
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        result["nodes"] = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]]
        serve_under_load(cluster.address, kb, work, result)
    except BaseException as exc:
        result["error"] = repr(exc)[:4000]
        raise
    finally:
        result_file.write_text(json.dumps(result, indent=2, default=str))
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
