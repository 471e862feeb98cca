"""A simulated multi-node cluster, and the default commands run on it (``tests/test_multinode.py`` runs this file in a
process of its own: a Ray driver connects to one cluster at a time, and the suite's session has its own).

    python -m tests.multinode WORKDIR RESULT.json KB

The cluster is ``ray.cluster_utils.Cluster``: a 2-CPU head and two workers of 6 logical CPUs and 2 fake GPUs each
(one raylet per node; fake GPUs have no CUDA, so models run on CPU there). On it: ``kb build``, ``complete`` with
the defaults, ``complete --dry-run``, ``complete --accelerators gpu`` with the BLIP2 and SDXL classes (tiny random
checkpoints), and a local path no node sees. What each step returned goes to RESULT.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HEAD = {"num_cpus": 2, "num_gpus": 0}
WORKER = {"num_cpus": 6, "num_gpus": 2}  # a CPU per GPU actor, and some for the CPU pools and tasks
WORKERS = 2
OBJECT_STORE_BYTES = 200 * 1024**2  # per node; the rows are small
CPU_ROWS, CPU_SHARDS = 120, 4  # the default job's input: shards enough for a read per branch and node
GPU_ROWS = 16  # the model job's: rows of both directions, so both generators run


def start_cluster():
    from bench.common import start_cluster as local_cluster

    return local_cluster(HEAD, [WORKER] * WORKERS, OBJECT_STORE_BYTES)


def main(work: Path, result_file: Path, kb: str) -> None:
    import ray

    from rag4dmc.pipeline.config import JobConfig
    from rag4dmc.pipeline.demo.corpus import write_split
    from rag4dmc.pipeline.io.shared_paths import PathNotShared, check_local_paths
    from rag4dmc.pipeline.job.runner import JobSpec, run_job
    from tests.test_job import JOB, _incomplete
    from tests.tiny_models import tiny_model_job

    t0 = time.perf_counter()
    cluster = start_cluster()
    ray.init(address=cluster.address, log_to_driver=False)
    result: dict = {"nodes": {n["NodeID"][:12]: n["Resources"] for n in ray.nodes() if n["Alive"]}, "seconds": {}}
    lap = _laps(result["seconds"], t0)
    lap("cluster")
    try:
        data = work / "data"
        write_split(_incomplete(CPU_ROWS, seed=3), data, CPU_SHARDS)
        result["dry_run"] = run_job(JobSpec(data=str(data), kb=kb, out=str(work / "dry"), dry_run=True))
        result["dry_run_wrote"] = sorted(p.name for p in (work / "dry").glob("*")) if (work / "dry").exists() else []
        lap("dry_run")
        result["cpu"] = run_job(JobSpec(data=str(data), kb=kb, out=str(work / "out-cpu"), cfg=JobConfig()))
        lap("cpu_job")

        gpu_data = work / "gpu-data"
        write_split(_incomplete(GPU_ROWS, seed=4), gpu_data, 2)
        cfg = tiny_model_job(JOB, work / "weights", accelerators="gpu")
        result["gpu"] = run_job(JobSpec(data=str(gpu_data), kb=kb, out=str(work / "out-gpu"), cfg=cfg))
        lap("gpu_job")
        try:
            check_local_paths({"--data": str(work / "only-on-some-machine")})
            result["unseen_path"] = None
        except PathNotShared as exc:
            result["unseen_path"] = str(exc)
    finally:
        result_file.write_text(json.dumps(result, indent=2, default=str))
        ray.shutdown()
        cluster.shutdown()


def _laps(seconds: dict, t0: float):
    """A recorder of each step's wall seconds into ``seconds`` (RESULT.json's ``seconds``: where the time goes)."""
    last = [t0]

    def lap(name: str) -> None:
        now = time.perf_counter()
        seconds[name] = round(now - last[0], 1)
        last[0] = now

    return lap


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
