"""Scale-out efficiency of the default ``complete`` job on simulated multi-node, multi-GPU clusters.

Each cluster is ``ray.cluster_utils.Cluster``: a raylet per node, all on this machine, a small CPU head and
nodes of ``--gpus-per-node`` fake GPUs (logical resources: nothing runs on a GPU). The job is
``rag4dmc.pipeline.job.runner.run_job`` with the default ``JobConfig`` except ``accelerators: gpu`` and no pool settings: the
pools are whatever the job sizes from the cluster. With ``RAG4DMC_STANDIN`` set (``actors/standin.py``) the
encoder, BLIP2 and SDXL stages are stand-ins that declare the real models' resources (Ray schedules and packs
them as it would the models) and hold their fake GPU for the published per-row costs (docs/scaling.md) times a
scale; their candidates come from the nearest-neighbour generators. Everything else (read, decode, retrieval,
selection, finalize, commit) is the real job on this machine's CPUs.

Ideal rate: G GPUs / (GPU-seconds per row summed over the stages, each direction weighted by its share of the
rows) = ``G / sum(rag4dmc.actors.standin.gpu_seconds_per_row(share))``. The stand-ins' scale is chosen per cluster so that
the ideal rate is ``--ideal-share`` of what the CPU side sustains, measured first on the same cluster as the
same job with the stand-ins at ``--capacity-scale`` (no GPU cost to speak of): the GPUs, not this 2-core machine,
must bound the rate, or the efficiency says nothing about scale-out.

Measured rate: every stand-in call is logged (``RAG4DMC_STANDIN``'s ``log``: role, rows, start, end, process,
node). Per direction, the rows its generator finished against time, fitted with a line between ``--window``
fractions of the rows it finished in the run; the job's rate is the slower direction's divided by its share of
the rows (a branch that keeps up only by leaving GPUs idle counts against it). Ramp-up: where that line meets
zero rows, counted from the driver's start. Efficiency = rate / ideal. A run stops after ``--run-s`` seconds if
the job has not finished (its driver is killed; the rate is a steady one all the same), so a size can be
measured whatever the job's length. GPU busy share: the generators' held seconds in the window over G x the
window. From the log also: the generator processes that worked and the most that held a GPU at once, and the
nodes they ran on. The driver's log gives each pool's planned size; ``summary.json["pools"]`` (peak actors,
actors per node, busy share, the bounding pool) is printed for runs that finish.

``--block-rows 256,16`` measures the default blocks and smaller ones (the job hands a whole block to one actor
of a pool, so the blocks in flight bound how many actors of a pool can work at once).

``--autoscale``: from zero GPU workers. A fake multi-node autoscaler (``ray.cluster_utils.AutoscalingCluster``
with a provider that also sets each node's memory; Ray's wheel lacks the fake provider's example config, so the
config is built here) starts a CPU-only head; the GPU worker type has min 0 and max G / gpus-per-node nodes.
Reported: each GPU node's join time, the rounds of nodes joining, the time to 0.8 of the run's steady rate (its
rate between 50 % and 90 % of its rows) and whether the GPU nodes were released ``idle_timeout`` after the
job. ``AutoscalingCluster.start()`` runs ``ray stop --force``, which kills every Ray process it can see, so this
mode re-executes itself in new PID, mount and network namespaces (``unshare --pid --fork --mount-proc --net``,
loopback up, a private ``RAY_TMPDIR``): there it sees only its own processes, and every process it started dies
with the namespace. Inside, it refuses to start if any raylet is visible; outside, it checks that every raylet
alive before is alive after. ``--check-isolation`` runs only that check around a ``ray stop --force`` inside,
with a Ray instance of its own outside as a witness.

    python bench/cluster.py                                # 4, 8, 16 fake GPUs, 2 per node
    python bench/cluster.py --gpus 8 --block-rows 256,16 --kb /tmp/r4c-kb/kb
    python bench/cluster.py --check-isolation
    python bench/cluster.py --autoscale --gpus 8 --ideal-rate 3 --kb /tmp/r4c-kb/kb
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import REPO, Target, count, report  # noqa: E402
from bench.common import start_cluster as common_start_cluster  # noqa: E402

log = logging.getLogger("bench.cluster")

HEAD_CPUS = 4  # logical: the driver's tasks, the CPU pools (retrieval), Ray Data's read and map tasks
HEAD_OBJECT_STORE_BYTES = 768 * 1024**2
NODE_OBJECT_STORE_BYTES = 200 * 1024**2  # per GPU node: the batches on their way through it
NODE_CPUS_PER_GPU = 2  # logical CPUs per fake GPU (a g5.2xlarge has 8; every CPU here is one of the same two)
NODE_MEMORY_GB_PER_GPU = 40  # logical memory per fake GPU: an SDXL actor (14 GiB) and a CLIP encoder (4) fit
ROWS_PER_SHARD = 500
KB_MAPPING_EPOCHS = 30
GENERATORS = {"text_generator": "i2t", "image_generator": "t2i"}  # stand-in role -> the direction it completes
TARGET_EFFICIENCY = 0.85
TARGET_EFFICIENCY_GPUS = (8, 16)
TARGET_AUTOSCALE_SHARE = 0.8  # of the steady rate, reached from zero GPU workers ...
TARGET_AUTOSCALE_ROUNDS = 2  # ... within this many autoscaler rounds
AUTOSCALER_UPDATE_S = 5  # Ray's default autoscaler period (AutoscalingCluster sets 1 s for its tests)
IDLE_TIMEOUT_MIN = 0.5  # the fake cluster's idle timeout (ray_cluster.yaml's is 10 minutes)
UPSCALING_SPEED = 1.0  # as ray_cluster.yaml
ISOLATED_ENV = "RAG4DMC_BENCH_ISOLATED"  # set inside the namespaces; the autoscale mode refuses to run without it
DRIVER_STOP_S = 20  # a stopped driver's grace before SIGKILL
FREE_WAIT_S = 120  # after a run, how long to wait for the cluster's GPUs to be free again


# ---------------------------------------------------------------------------------------------- data and KB


def prepare_environment(root: Path) -> None:
    """Ray's temp folder private to this run (its address file and sockets), and this checkout importable by
    every worker of every node."""
    os.environ["RAY_TMPDIR"] = str(root / "rt")
    (root / "rt").mkdir(parents=True, exist_ok=True)
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([str(REPO), *filter(None, os.environ.get(
        "PYTHONPATH", "").split(os.pathsep))]))
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.pop("RAY_ADDRESS", None)
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def build_kb(out: Path, n_internal: int, n_external: int) -> tuple[str, float]:
    """Generated pairs and a KB built by the KB job with the lite encoders, on a 2-CPU local Ray of its own,
    without the stand-ins (a stand-in encoder would fill the KB with hash vectors). Throughput does not depend on
    the KB's quality: a short mapping fit and no calibration keep the build short."""
    import ray

    from rag4dmc.pipeline.config import CalibrationConfig, KBConfig, MappingConfig
    from rag4dmc.pipeline.demo.corpus import make_external, make_internal
    from rag4dmc.pipeline.io.datasets import write_parquet
    from rag4dmc.pipeline.job.kb_runner import KBBuildSpec, run_kb_build

    assert "RAG4DMC_STANDIN" not in os.environ
    root = out.parent / f"{out.name}-pairs"
    write_parquet(make_internal(n_internal).select(["id", "image", "text"]), f"{root}/internal/part-0.parquet")
    write_parquet(make_external(n_external).select(["id", "image", "text"]), f"{root}/external/part-0.parquet")
    cfg = KBConfig(mapping=MappingConfig(max_epochs=KB_MAPPING_EPOCHS, hidden_dim=256),
                   calibration=CalibrationConfig(enabled=False))
    ray.init(num_cpus=2, object_store_memory=HEAD_OBJECT_STORE_BYTES, include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    try:
        run_kb_build(KBBuildSpec(internal=f"{root}/internal", external=f"{root}/external", out=str(out), cfg=cfg))
    finally:
        ray.shutdown()
    return str(out), time.perf_counter() - t0


def write_data(folder: Path, n: int, seed: int) -> dict[str, int]:
    """``n`` incomplete rows (half lack the image, half the text) in ROWS_PER_SHARD-row parquet shards, unless the
    folder already holds ``n`` rows; the rows of each direction."""
    import pyarrow.parquet as pq

    from rag4dmc.pipeline.demo.corpus import make_incomplete
    from rag4dmc.pipeline.io.datasets import write_parquet

    shards = sorted(folder.glob("part-*.parquet"))
    if shards:
        images = [v for f in shards for v in pq.read_table(f, columns=["image"]).column("image").to_pylist()]
        if len(images) == n:
            no_image = sum(v is None for v in images)
            return {"i2t": n - no_image, "t2i": no_image}
        raise SystemExit(f"{folder} holds {len(images)} rows, not {n}: give another --data folder")
    table = make_incomplete(n, seed=seed, missing_rate=1.0).select(["id", "image", "text"])
    for j, s in enumerate(range(0, n, ROWS_PER_SHARD)):
        write_parquet(table.slice(s, ROWS_PER_SHARD), f"{folder}/part-{j:05d}.parquet")
    no_image = sum(v is None for v in table.column("image").to_pylist())
    return {"i2t": n - no_image, "t2i": no_image}


def gpu_seconds_per_row(scale: float, share_i2t: float) -> dict[str, float]:
    """``rag4dmc.actors.standin.gpu_seconds_per_row`` at ``scale`` (the stand-ins read their scale from the environment)."""
    from rag4dmc.actors import standin

    saved = os.environ.get(standin.ENV)
    os.environ[standin.ENV] = json.dumps({"scale": scale})
    try:
        return standin.gpu_seconds_per_row(share_i2t)
    finally:
        os.environ.pop(standin.ENV) if saved is None else os.environ.__setitem__(standin.ENV, saved)


# -------------------------------------------------------------------------------------------------- driver


def drive(spec: dict) -> None:
    """The job, as its own driver process (``--drive``): connects to the cluster, runs ``run_job`` with the default
    config but ``accelerators: gpu`` (and ``block_rows`` when given), and logs the plan."""
    import ray

    from bench.pipeline import _installed_niqe, job_config
    from rag4dmc.pipeline.job.runner import JobSpec, run_job

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("rag4dmc").setLevel(logging.INFO)
    update = {"accelerators": "gpu"}
    if spec.get("block_rows"):
        update["block_rows"] = spec["block_rows"]
    cfg = job_config(_installed_niqe()).model_copy(update=update)  # NIQE as the defaults have it, if installed
    ray.init(address=spec["address"], runtime_env={"env_vars": spec["env"]}, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    run_job(JobSpec(data=spec["data"], kb=spec["kb"], out=spec["out"], cfg=cfg))


def run_once(address: str, data: Path, kb: str, out: Path, scale: float, rows: dict[str, int], run_s: float,
             block_rows: int | None, window: tuple[float, float], watch_nodes: bool = False, name: str = "run") -> dict:
    """The job once on the cluster at ``address`` with the stand-ins at ``scale``, its driver a process of its own
    stopped after ``run_s`` seconds; the figures from the stand-ins' log (kept in ``<out>-<name>-holds``)."""
    from rag4dmc.actors import standin

    holds = out.parent / f"{out.name}-{name}-holds"
    for folder in (out, holds):
        shutil.rmtree(folder, ignore_errors=True)
    value = json.dumps({"scale": scale, "log": str(holds)})
    spec = {"address": address, "data": str(data), "kb": kb, "out": str(out), "block_rows": block_rows,
            "env": {standin.ENV: value}}
    driver_log = out.parent / f"{out.name}-{name}-driver.log"
    t0 = time.time()
    watch = NodeWatch(address, t0) if watch_nodes else None
    memory = MemoryWatch()
    with open(driver_log, "w") as f:
        driver = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--drive", json.dumps(spec)],
                                  env={**os.environ, standin.ENV: value}, stdout=f, stderr=subprocess.STDOUT)
        try:
            rc = driver.wait(timeout=run_s)
            finished = rc == 0
        except subprocess.TimeoutExpired:
            finished, rc = False, None
            stop(driver)
    wall = time.time() - t0
    joins = watch.stop() if watch else []
    rss_gib, low_gib = memory.stop()
    wait_until_free(address)
    text = driver_log.read_text(errors="replace")
    if rc not in (0, None):
        raise RuntimeError(f"the job's driver failed (exit {rc}); its log {driver_log} ends:\n{text[-3000:]}")
    summary = json.loads((out / "summary.json").read_text()) if finished else {}
    share = rows["i2t"] / (rows["i2t"] + rows["t2i"])
    gpu_s = gpu_seconds_per_row(scale, share)
    result = analyse(read_holds(holds), t0, share, window)
    result.update(t0=t0, wall_s=wall, finished=finished, summary=summary, scale=scale, gpu_seconds_per_row=gpu_s,
                  planned=planned_pools(text), block_rows=block_rows, joins=joins, holds=str(holds),
                  load=os.getloadavg()[0], rss_gib=rss_gib, available_low_gib=low_gib)
    return result


def stop(driver: subprocess.Popen) -> None:
    """Stop a driver (its job's actors go with it): SIGTERM, SIGKILL after DRIVER_STOP_S."""
    driver.terminate()
    try:
        driver.wait(timeout=DRIVER_STOP_S)
    except subprocess.TimeoutExpired:
        driver.kill()
        driver.wait(timeout=DRIVER_STOP_S)


def wait_until_free(address: str) -> None:
    """Until every GPU of the cluster is free again (a stopped job's actors are being killed)."""
    import ray

    ray.init(address=address, log_to_driver=False)
    try:
        deadline = time.time() + FREE_WAIT_S
        while time.time() < deadline:
            total, free = ray.cluster_resources().get("GPU", 0), ray.available_resources().get("GPU", 0)
            if free >= total:
                return
            time.sleep(1)
        log.warning("the cluster still holds %g of its %g GPUs after %d s", total - free, total, FREE_WAIT_S)
    finally:
        ray.shutdown()


def planned_pools(driver_log: str) -> dict[str, str]:
    """Each pool's plan as the driver logged it (``pool <name>: <min>..<max> actors ...``)."""
    out = {}
    for m in re.finditer(r"pool (\S+): (.*)", driver_log):
        out[m.group(1)] = m.group(2).strip()
    return out


# ------------------------------------------------------------------------------------------------ analysis


def read_holds(folder: Path) -> list[tuple[str, int, float, float, int, str]]:
    """Every stand-in call logged: (role, rows, start, end, pid, node)."""
    out = []
    for f in folder.glob("*.log") if folder.is_dir() else []:
        for line in f.read_text().splitlines():
            parts = line.split()
            if len(parts) == 6:
                out.append((parts[0], int(parts[1]), float(parts[2]), float(parts[3]), int(parts[4]), parts[5]))
    return out


def steady_fit(ends: np.ndarray, rows: np.ndarray, t0: float, window: tuple[float, float]) -> dict | None:
    """Rows per second and ramp-up (seconds from ``t0`` to where the fitted line crosses zero rows) of one
    direction's finished rows, fitted between ``window`` fractions of its total."""
    if len(ends) < 3:
        return None
    order = np.argsort(ends)
    t, cum = ends[order] - t0, np.cumsum(rows[order])
    total = cum[-1]
    sel = (cum >= window[0] * total) & (cum <= window[1] * total)
    if sel.sum() < 3:
        return None
    slope, intercept = np.polyfit(t[sel], cum[sel], 1)
    if slope <= 0:
        return None
    return {"rows": int(total), "rows_per_s": float(slope), "ramp_s": float(-intercept / slope),
            "from_s": float(t[sel][0]), "to_s": float(t[sel][-1])}


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    best = now = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def analyse(holds: list, t0: float, share_i2t: float, window: tuple[float, float]) -> dict:
    """The run's rate (the slower direction's over its share), ramp-up, busy share and generator processes."""
    fits, gen = {}, {}
    for role, direction in GENERATORS.items():
        mine = [h for h in holds if h[0] == role]
        gen[direction] = {"processes": len({h[4] for h in mine}), "nodes": len({h[5] for h in mine}),
                          "most_at_once": most_at_once([(h[2], h[3]) for h in mine]),
                          "rows": sum(h[1] for h in mine)}
        fits[direction] = steady_fit(np.array([h[3] for h in mine]), np.array([h[1] for h in mine]), t0, window)
    shares = {"i2t": share_i2t, "t2i": 1.0 - share_i2t}
    rates = [fits[d]["rows_per_s"] / shares[d] for d in fits if fits[d] and shares[d]]
    rate = min(rates) if len(rates) == len([d for d in shares if shares[d]]) else None
    busy = None
    if all(fits.values()):
        lo = t0 + max(f["from_s"] for f in fits.values())
        hi = t0 + min(f["to_s"] for f in fits.values())
        if hi > lo:
            held = sum(max(0.0, min(h[3], hi) - max(h[2], lo)) for h in holds if h[0] in GENERATORS)
            busy = {"held_s": held, "window_s": hi - lo}
    return {"rate": rate, "fits": fits, "generators": gen, "busy": busy,
            "ramp_s": max((f["ramp_s"] for f in fits.values() if f), default=None)}


def rate_reached(holds: list, t0: float, rate: float, share: float, span_s: float, share_i2t: float) -> float | None:
    """Seconds from ``t0`` until the job's rate over the last ``span_s`` seconds (each direction's finished rows
    over its share of the rows, the slower of the two) first reaches ``share`` of ``rate``."""
    shares = {"i2t": share_i2t, "t2i": 1.0 - share_i2t}
    ends, cum = {}, {}
    for d in shares:
        mine = sorted((h[3] - t0, h[1]) for h in holds if GENERATORS.get(h[0]) == d)
        if not mine:
            return None
        ends[d] = np.array([e for e, _ in mine])
        cum[d] = np.cumsum([k for _, k in mine])

    def done(d: str, t: float) -> float:
        i = np.searchsorted(ends[d], t, side="right") - 1
        return float(cum[d][i]) if i >= 0 else 0.0

    for t in np.unique(np.concatenate(list(ends.values()))):
        if t >= span_s and min((done(d, t) - done(d, t - span_s)) / span_s / shares[d] for d in shares) >= share * rate:
            return float(t)
    return None


class MemoryWatch:
    """Samples, from a thread, the resident memory of this process's descendants (the cluster's raylets and
    workers, the driver) and the machine's available memory: their peak and its low point."""

    def __init__(self, interval_s: float = 2.0):
        import threading

        import psutil

        self.peak_gib, self.low_gib = 0.0, psutil.virtual_memory().available / 2**30
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)
        self._thread.start()

    def _run(self, interval_s: float) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(interval_s):
            rss = 0
            for p in me.children(recursive=True):
                try:
                    rss += p.memory_info().rss
                except psutil.Error:
                    continue
            self.peak_gib = max(self.peak_gib, rss / 2**30)
            self.low_gib = min(self.low_gib, psutil.virtual_memory().available / 2**30)

    def stop(self) -> tuple[float, float]:
        self._stop.set()
        self._thread.join()
        return self.peak_gib, self.low_gib


class NodeWatch:
    """Connected to the cluster as a driver of its own, notes when each GPU node is first seen alive."""

    def __init__(self, address: str, t0: float):
        import threading

        import ray

        ray.init(address=address, log_to_driver=False)
        self.t0, self.joins = t0, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import ray

        while not self._stop.is_set():
            for n in ray.nodes():
                if n.get("Alive") and n["Resources"].get("GPU", 0) > 0 and n["NodeID"] not in self.joins:
                    self.joins[n["NodeID"]] = time.time() - self.t0
            self._stop.wait(1.0)

    def stop(self) -> list[float]:
        import ray

        self._stop.set()
        self._thread.join()
        ray.shutdown()
        return sorted(self.joins.values())


# ------------------------------------------------------------------------------------------- static clusters


def start_cluster(gpus: int, gpus_per_node: int, head_cpus: int):
    """A CPU head and ``gpus / gpus_per_node`` GPU nodes, each raylet in its own processes on this machine."""
    if gpus % gpus_per_node:
        raise ValueError(f"{gpus} GPUs do not split into nodes of {gpus_per_node}")
    node = {"num_cpus": NODE_CPUS_PER_GPU * gpus_per_node, "num_gpus": gpus_per_node,
            "memory": NODE_MEMORY_GB_PER_GPU * gpus_per_node * 1024**3, "object_store_memory": NODE_OBJECT_STORE_BYTES}
    return common_start_cluster({"num_cpus": head_cpus, "num_gpus": 0, "object_store_memory": HEAD_OBJECT_STORE_BYTES},
                                [node] * (gpus // gpus_per_node))


def result_row(gpus: int, label: str, r: dict, ideal: float | None, capacity: float | None) -> dict:
    fits, gen = r["fits"], r["generators"]
    busy = r["busy"]
    return {"GPUs": gpus, "run": label, "block_rows": r["block_rows"] or "default", "scale": r["scale"],
            "rows_per_s": r["rate"], "ideal_rows_per_s": ideal,
            "efficiency": r["rate"] / ideal if (ideal and r["rate"]) else None, "cpu_capacity": capacity,
            "ideal_over_capacity": ideal / capacity if (ideal and capacity) else None,
            "i2t_rows_per_s": fits["i2t"]["rows_per_s"] if fits["i2t"] else None,
            "t2i_rows_per_s": fits["t2i"]["rows_per_s"] if fits["t2i"] else None,
            "ramp_up_s": r["ramp_s"],
            "gpu_busy_share": busy["held_s"] / (gpus * busy["window_s"]) if (busy and gpus) else None,
            "blip2_busy_max": gen["i2t"]["most_at_once"], "sdxl_busy_max": gen["t2i"]["most_at_once"],
            "sdxl_processes": gen["t2i"]["processes"], "sdxl_nodes": gen["t2i"]["nodes"],
            "sdxl_planned": planned_max(r["planned"].get("generate:t2i")),
            "rows_generated": gen["i2t"]["rows"] + gen["t2i"]["rows"], "wall_s": r["wall_s"],
            "finished": r["finished"], "load_1min": r["load"], "rss_peak_gib": r["rss_gib"],
            "available_low_gib": r["available_low_gib"]}


def planned_max(plan: str | None) -> int | None:
    """The largest size in a planned pool's line (``1..3 actors ...``)."""
    m = re.match(r"\d+\.\.(\d+) actors", plan or "")
    return int(m.group(1)) if m else None


def pool_rows(label: str, r: dict) -> list[dict]:
    """Each pool: as planned (the driver's log) and, for a run that finished, as used (``summary.json``)."""
    used = r["summary"].get("pools") or {}
    bound = r["summary"].get("bounded_by")
    rows = []
    for name in dict.fromkeys([*r["planned"], *used]):
        u = used.get(name, {})
        per_node = u.get("actors_per_node")
        rows.append({"run": label, "pool": name, "planned": r["planned"].get(name, ""),
                     "peak_actors": u.get("peak_actors"),
                     "actors_per_node": json.dumps(sorted(per_node.values()) if isinstance(per_node, dict)
                                                   else per_node) if per_node is not None else None,
                     "busy_share": u.get("busy_share"), "bounding": "yes" if name == bound else ""})
    return rows


def static_mode(args, work: Path, kb: str, data: Path, rows: dict[str, int]) -> None:
    results, pools = [], []
    share = rows["i2t"] / (rows["i2t"] + rows["t2i"])
    per_row_at_1 = sum(gpu_seconds_per_row(1.0, share).values())
    for gpus in args.gpus:
        t_start = time.perf_counter()
        cluster = start_cluster(gpus, args.gpus_per_node, args.head_cpus)
        print(f"{gpus} GPUs: cluster of {1 + gpus // args.gpus_per_node} nodes up in "
              f"{time.perf_counter() - t_start:.0f} s", flush=True)
        try:
            capacity = None
            if args.ideal_rate is None:
                cap = run_once(cluster.address, data, kb, work / "out", args.capacity_scale, rows, args.run_s,
                               None, args.window, name=f"g{gpus}-capacity")
                capacity = cap["rate"]
                print(f"{gpus} GPUs, stand-ins at scale {args.capacity_scale:g}: the CPU side sustains "
                      f"{_fmt(capacity)} rows/s (wall {cap['wall_s']:.0f} s)", flush=True)
                results.append(result_row(gpus, "CPU-side capacity", cap, None, capacity))
                pools += pool_rows(f"{gpus} GPUs, capacity", cap)
                if capacity is None:
                    raise RuntimeError("the capacity run gave no steady rate; give it more --rows or --run-s")
            target = args.ideal_rate or args.ideal_share * capacity
            scale = gpus / (target * per_row_at_1)
            for block_rows in [] if args.capacity_only else args.block_rows:
                r = run_once(cluster.address, data, kb, work / "out", scale, rows, args.run_s, block_rows or None,
                             args.window, name=f"g{gpus}-b{block_rows}")
                ideal = gpus / sum(r["gpu_seconds_per_row"].values())
                row = result_row(gpus, "stand-ins, published costs", r, ideal, capacity)
                results.append(row)
                pools += pool_rows(f"{gpus} GPUs, blocks {block_rows or 'default'}", r)
                print(f"{gpus} GPUs, blocks {block_rows or 'default'}, scale {scale:.3g}: {_fmt(r['rate'])} rows/s, "
                      f"ideal {ideal:.3g}, efficiency {_fmt(row['efficiency'])}, ramp-up {_fmt(r['ramp_s'])} s, "
                      f"SDXL busy at most {row['sdxl_busy_max']} at once, wall {r['wall_s']:.0f} s"
                      f"{'' if r['finished'] else ' (stopped)'}", flush=True)
        finally:
            cluster.shutdown()
    targets = [Target(f"efficiency at {r['GPUs']} GPUs, blocks {r['block_rows']}", r["efficiency"],
                      TARGET_EFFICIENCY)
               for r in results if r["GPUs"] in TARGET_EFFICIENCY_GPUS and r["efficiency"] is not None]
    report("cluster", {
        "scale-out: rows/s against the ideal (G / GPU-seconds per row)": (results, list(results[0])),
        "pools: planned (driver log) and used (summary.json, runs that finished)":
            (pools, ["run", "pool", "planned", "peak_actors", "actors_per_node", "busy_share", "bounding"])},
        {"args": _jsonable(vars(args)), "rows": rows, "gpu_seconds_per_row_at_scale_1": per_row_at_1}, targets)


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def _jsonable(d: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


# -------------------------------------------------------------------------------------- isolation, autoscaling


def raylets() -> set[int]:
    """PIDs of every raylet this namespace can see."""
    found = subprocess.run(["pgrep", "-f", "raylet/raylet"], capture_output=True, text=True, timeout=30)
    return {int(p) for p in found.stdout.split()}


def alive(pids: set[int]) -> set[int]:
    out = set()
    for p in pids:
        try:
            os.kill(p, 0)
            out.add(p)
        except ProcessLookupError:
            pass
        except PermissionError:
            out.add(p)
    return out


def isolated(argv: list[str], root: Path, timeout_s: float) -> int:
    """Run ``argv`` in new PID, mount and network namespaces (loopback up, ``RAY_TMPDIR`` under ``root``);
    check that every raylet alive outside before is alive after. Returns the command's exit status (99 when a
    raylet outside died)."""
    before = raylets()
    inner = f"ip link set lo up && exec {' '.join(shlex.quote(a) for a in argv)}"
    (root / "rt").mkdir(parents=True, exist_ok=True)
    # no token authentication inside: a ~/.ray/auth_token left by an earlier `ray start` turns it on for the fake
    # cluster's nodes, and the autoscaler's drivers were refused (InvalidAuthToken); the namespace has no network
    env = {**os.environ, ISOLATED_ENV: "1", "RAY_TMPDIR": str(root / "rt"), "RAY_AUTH_MODE": "disabled"}
    print(f"raylets outside before: {sorted(before) or 'none'}", flush=True)
    try:
        rc = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "--net", "bash", "-c", inner], env=env,
                            timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:  # the namespace's init is killed: every process in it dies with it
        rc = 124
    lost = before - alive(before)
    print(f"raylets outside after: {len(before) - len(lost)} of {len(before)} alive"
          + (f"; LOST {sorted(lost)}: isolation FAILED" if lost else ""), flush=True)
    return 99 if lost else rc


def guard_inside() -> None:
    """Refuse to go on unless this process is in the namespaces and sees no raylet."""
    if os.environ.get(ISOLATED_ENV) != "1":
        raise SystemExit("the autoscale mode runs only inside its namespaces (run it without --inside)")
    visible = raylets()
    if visible:
        raise SystemExit(f"raylets {sorted(visible)} are visible inside the namespace: not isolated, stopping")
    if os.getpid() > 1000:
        raise SystemExit(f"pid {os.getpid()}: this is not a fresh PID namespace, stopping")


def check_isolation(work: Path) -> bool:
    """A Ray instance of our own outside as a witness; ``ray stop --force`` inside the namespaces; the witness
    and every other raylet outside must survive."""
    witness = subprocess.Popen(
        [sys.executable, "-c", "import ray, time; ray.init(num_cpus=1, include_dashboard=False); "
         "print('up', flush=True); time.sleep(900)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "RAY_TMPDIR": str(work / "w")})
    (work / "w").mkdir(parents=True, exist_ok=True)
    try:
        if witness.stdout.readline().strip() != "up":
            raise RuntimeError("the witness Ray instance did not start")
        before = raylets()
        print(f"raylets outside, the witness's among them: {sorted(before)}", flush=True)
        probe = ("echo inside: pid $$, $(ls /proc | grep -c '^[0-9]') processes visible, "
                 "$(pgrep -fc '[r]aylet/raylet') raylets visible; ray stop --force")
        rc = isolated(["bash", "-c", probe], work, 120)
        survived = alive(before) == before
        print(f"ray stop --force inside: exit {rc}; every raylet outside survived: {survived}", flush=True)
        return survived and rc == 0
    finally:
        witness.send_signal(signal.SIGINT)
        try:
            witness.wait(timeout=60)
        except subprocess.TimeoutExpired:
            witness.kill()


FAKE_BASE_CONFIG = {  # ray's fake_multi_node/example.yaml (not in the wheel) with this module's provider
    "cluster_name": "fake_multinode", "max_workers": 8,
    "provider": {"type": "external", "module": "bench.cluster.FakeGpuNodeProvider", "use_node_id_as_ip": True,
                 "disable_node_updaters": True, "disable_launch_config_check": True},
    "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": UPSCALING_SPEED,
    "idle_timeout_minutes": IDLE_TIMEOUT_MIN, "docker": {}, "initialization_commands": [], "setup_commands": [],
    "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
    "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
    "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
}


def fake_gpu_node_provider():
    """Ray's ``FakeMultiNodeProvider``, except that a node type's ``memory`` becomes the node's memory resource
    (the stock provider passes it on as a custom resource, which Ray refuses)."""
    from ray.autoscaler._private.fake_multi_node import node_provider as fake

    class Provider(fake.FakeMultiNodeProvider):
        def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
            resources = copy.deepcopy(resources)
            memory = resources.pop("memory", None)
            with self.lock:
                node_type = tags[fake.TAG_RAY_USER_NODE_TYPE]
                next_id = self._next_hex_node_id()
                gcs = self._gcs_address or fake.build_address(fake.ray._private.services.get_node_ip_address(), 6379)
                params = fake.ray._private.parameter.RayParams(
                    min_worker_port=0, max_worker_port=0, dashboard_port=None, dashboard_agent_listen_port=0,
                    num_cpus=resources.pop("CPU", 0), num_gpus=resources.pop("GPU", 0), memory=memory,
                    object_store_memory=resources.pop("object_store_memory", None), resources=resources,
                    labels=labels, redis_address=gcs, gcs_address=gcs,
                    env_vars={"RAY_OVERRIDE_NODE_ID_FOR_TESTING": next_id, "RAY_CLOUD_INSTANCE_ID": next_id,
                              "RAY_NODE_TYPE_NAME": node_type,
                              fake.ray_constants.RESOURCES_ENVIRONMENT_VARIABLE: json.dumps(resources),
                              fake.ray_constants.LABELS_ENVIRONMENT_VARIABLE: json.dumps(labels)})
                node = fake.ray._private.node.Node(params, head=False, shutdown_at_exit=False, spawn_reaper=False)
                all_tags = {fake.TAG_RAY_NODE_KIND: fake.NODE_KIND_WORKER, fake.TAG_RAY_USER_NODE_TYPE: node_type,
                            fake.TAG_RAY_NODE_NAME: next_id, fake.TAG_RAY_NODE_STATUS: fake.STATUS_UP_TO_DATE}
                all_tags.update(tags)
                self._nodes[next_id] = {"tags": all_tags, "node": node}

    return Provider


def __getattr__(name: str):
    if name == "FakeGpuNodeProvider":  # the autoscaler imports the provider by name (type "external")
        return fake_gpu_node_provider()
    raise AttributeError(name)


def autoscaling_cluster(gpus: int, gpus_per_node: int, head_cpus: int):
    """``AutoscalingCluster`` with a CPU head and a GPU worker type of 0 to ``gpus / gpus_per_node`` nodes."""
    from ray.cluster_utils import AutoscalingCluster

    class Cluster(AutoscalingCluster):
        def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
            config = copy.deepcopy(FAKE_BASE_CONFIG)
            config["available_node_types"] = {**worker_node_types, "ray.head.default": {
                "resources": dict(head_resources), "node_config": {}, "max_workers": 0}}
            config["max_workers"] = sum(t.get("max_workers", 0) for t in worker_node_types.values())
            config.update(config_kwargs)
            return config

    return Cluster(
        head_resources={"CPU": head_cpus, "object_store_memory": HEAD_OBJECT_STORE_BYTES},
        worker_node_types={"gpu_worker": {
            "resources": {"CPU": NODE_CPUS_PER_GPU * gpus_per_node, "GPU": gpus_per_node,
                          "memory": NODE_MEMORY_GB_PER_GPU * gpus_per_node * 1024**3,
                          "object_store_memory": NODE_OBJECT_STORE_BYTES},
            "node_config": {}, "min_workers": 0, "max_workers": gpus // gpus_per_node}})


def gpu_nodes_alive(address: str) -> list[tuple[str, float]]:
    import ray

    ray.init(address=address, log_to_driver=False)
    try:
        return [(n["NodeID"], n["Resources"].get("GPU", 0)) for n in ray.nodes()
                if n.get("Alive") and n["Resources"].get("GPU", 0) > 0]
    finally:
        ray.shutdown()


def join_rounds(joins: list[float]) -> int:
    """Groups of GPU nodes joining, a new group after a gap of more than one autoscaler period."""
    return sum(1 for i, t in enumerate(joins) if i == 0 or t - joins[i - 1] > AUTOSCALER_UPDATE_S)


def autoscale_mode(args, work: Path, kb: str, data: Path, rows: dict[str, int]) -> None:
    import ray

    guard_inside()
    gpus = max(args.gpus)
    share = rows["i2t"] / (rows["i2t"] + rows["t2i"])
    scale = args.scale or gpus / (args.ideal_rate * sum(gpu_seconds_per_row(1.0, share).values()))
    cluster = autoscaling_cluster(gpus, args.gpus_per_node, args.head_cpus)
    cluster.start(override_env={"AUTOSCALER_UPDATE_INTERVAL_S": str(AUTOSCALER_UPDATE_S)})
    try:
        address = f"{ray._private.services.get_node_ip_address()}:6379"
        print(f"autoscaling cluster up at {address}: GPU nodes now {len(gpu_nodes_alive(address))}", flush=True)
        r = run_once(address, data, kb, work / "out", scale, rows, args.run_s, None, (0.5, 0.9), watch_nodes=True,
                     name=f"autoscale-g{gpus}")
        ideal = gpus / sum(r["gpu_seconds_per_row"].values())
        t80 = rate_reached(read_holds(Path(r["holds"])), r["t0"], r["rate"], TARGET_AUTOSCALE_SHARE,
                           args.rate_span_s, share) if r["rate"] else None
        joins = r["joins"]
        t_end = time.time()
        left = gpu_nodes_alive(address)
        while left and time.time() - t_end < IDLE_TIMEOUT_MIN * 60 + 12 * AUTOSCALER_UPDATE_S:
            time.sleep(5)
            left = gpu_nodes_alive(address)
        released_s = time.time() - t_end
    finally:
        cluster.shutdown()
    rounds = join_rounds([t for t in joins if t80 is None or t <= t80])
    out = [{"GPUs (max)": gpus, "scale": scale, "steady_rows_per_s": r["rate"], "ideal_rows_per_s": ideal,
            "steady_over_ideal": r["rate"] / ideal if r["rate"] else None, "t_0.8_steady_s": t80,
            "gpu_node_joins_s": json.dumps([round(t, 1) for t in joins]), "join_rounds_before_t80": rounds,
            "ramp_up_s": r["ramp_s"], "wall_s": r["wall_s"], "finished": r["finished"],
            "gpu_nodes_left": len(left), "checked_after_s": round(released_s, 1)}]
    targets = []
    if t80 is not None:
        targets.append(Target("autoscaler rounds (GPU nodes joining) before 0.8 of the steady rate", rounds,
                              TARGET_AUTOSCALE_ROUNDS, at_least=False))
    targets.append(Target(f"GPU nodes alive {released_s:.0f} s after the job (idle timeout "
                          f"{IDLE_TIMEOUT_MIN * 60:.0f} s)", len(left), 0, at_least=False))
    report("cluster_autoscale", {"from zero GPU workers": (out, list(out[0])),
                                 "pools": (pool_rows("autoscale", r), ["run", "pool", "planned", "peak_actors",
                                                                       "actors_per_node", "busy_share", "bounding"])},
           {"args": _jsonable(vars(args)), "rows": rows, "summary": r["summary"]}, targets)


# ---------------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=lambda t: [int(x) for x in t.split(",")], default=[4, 8, 16],
                    help="cluster sizes in fake GPUs (--autoscale: the largest is the autoscaler's limit)")
    ap.add_argument("--gpus-per-node", type=int, default=2)
    ap.add_argument("--head-cpus", type=int, default=HEAD_CPUS)
    ap.add_argument("--rows", type=count, default=12000, help="incomplete rows per run (half i2t, half t2i)")
    ap.add_argument("--run-s", type=float, default=360, help="a run's driver is stopped after this many seconds")
    ap.add_argument("--block-rows", type=lambda t: [int(x) for x in t.split(",")], default=[0],
                    help="block sizes to run (0: the job's default)")
    ap.add_argument("--data", default=None, help="the incomplete rows' folder; written there (and kept) if empty")
    ap.add_argument("--kb-internal", type=count, default=300)
    ap.add_argument("--kb-external", type=count, default=300)
    ap.add_argument("--kb", default=None, help="a KB built with the lite encoder; built there (and kept) if absent")
    ap.add_argument("--ideal-share", type=float, default=0.4,
                    help="the scale makes the ideal rate this share of the measured CPU-side capacity")
    ap.add_argument("--ideal-rate", type=float, default=None,
                    help="the ideal rate in rows/s instead (no capacity run; needed with --autoscale)")
    ap.add_argument("--scale", type=float, default=None, help="--autoscale: the stand-ins' scale, as is")
    ap.add_argument("--capacity-only", action="store_true", help="only the CPU-side capacity run")
    ap.add_argument("--capacity-scale", type=float, default=1e-4, help="stand-in scale of the capacity run")
    ap.add_argument("--window", type=lambda t: tuple(float(x) for x in t.split(",")), default=(0.4, 0.9),
                    help="fractions of each direction's finished rows between which its rate is fitted")
    ap.add_argument("--rate-span-s", type=float, default=30.0, help="--autoscale: the rate's sliding window")
    ap.add_argument("--autoscale", action="store_true", help="from zero GPU workers, in isolated namespaces")
    ap.add_argument("--check-isolation", action="store_true", help="only check that the namespaces isolate")
    ap.add_argument("--timeout-s", type=float, default=1500, help="--autoscale: the isolated run's limit")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--drive", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a new one under /tmp, removed)")
    args = ap.parse_args()
    if args.drive:
        drive(json.loads(args.drive))
        return
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clusters shut down on a timeout's SIGTERM too

    work = Path(args.workdir or tempfile.mkdtemp(prefix="r4c-", dir="/tmp"))
    try:
        if args.check_isolation:
            ok = check_isolation(work)
            print(f"isolation {'works' if ok else 'FAILED: do not run --autoscale'}")
            sys.exit(0 if ok else 1)
        if args.autoscale and not args.inside:
            if args.ideal_rate is None and args.scale is None:
                raise SystemExit("--autoscale needs --ideal-rate (or --scale): it makes no capacity run")
            argv = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--inside", "--workdir", str(work)]
            sys.exit(isolated(argv, work, args.timeout_s))
        prepare_environment(work)
        if args.kb and Path(args.kb, "manifest.json").exists():
            kb = args.kb
        else:
            kb, kb_s = build_kb(Path(args.kb) if args.kb else work / "kb", args.kb_internal, args.kb_external)
            print(f"KB built in {kb_s:.0f} s: {kb}", flush=True)
        data = Path(args.data) if args.data else work / "data"
        rows = write_data(data, args.rows, seed=1)
        if args.autoscale:
            autoscale_mode(args, work, kb, data, rows)
        else:
            static_mode(args, work, kb, data, rows)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
