"""Shared helpers for the benchmark scripts: timing, peak memory, machine description, generated vectors,
size flags, target checks and result files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
GENERATE_CHUNK_ROWS = 100_000  # generated vectors are drawn this many rows at a time (bounded temporaries)


def machine() -> dict:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version()}


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_rss_gib: float = 0.0
    extra: dict = field(default_factory=dict)


@contextmanager
def measure(interval: float = 0.05):
    """Wall time and peak resident memory (sampled, so native allocations such as FAISS's count)."""
    proc = psutil.Process()
    m = Measurement()
    peak = [proc.memory_info().rss]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            stop.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    try:
        yield m
    finally:
        m.seconds = time.perf_counter() - t0
        stop.set()
        thread.join()
        m.peak_rss_gib = max(peak[0], proc.memory_info().rss) / 2**30


def table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table of the given columns."""
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(out)


def provenance() -> dict:
    """The commit measured, the tracked files that differ from it, and how busy the machine was."""
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(REPO), *cmd], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return ""

    modified = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {"commit": git("rev-parse", "HEAD").strip(), "modified_tracked_files": modified,
            "load_avg_1_5_15_min": [round(v, 2) for v in os.getloadavg()]}


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "provenance": provenance(), **payload}
    path.write_text(json.dumps(payload, indent=2, default=float))
    return path


# --------------------------------------------------------------------------------------------------
# Sizes, generated data, targets
# --------------------------------------------------------------------------------------------------

_SUFFIXES = {"k": 1_000, "m": 1_000_000}


def count(text: str) -> int:
    """A row count from a flag: ``20000``, ``20k``, ``1M``, ``1_000_000``."""
    t = text.strip().lower().replace("_", "")
    scale = _SUFFIXES.get(t[-1:], 1)
    value = float(t[:-1]) if scale > 1 else float(t)
    if value <= 0 or value * scale != int(value * scale):
        raise ValueError(f"not a positive row count: {text!r}")
    return int(value * scale)


def counts(text: str) -> list[int]:
    """A comma-separated list of row counts (``1k,5k,20k``), as an argparse ``type``."""
    return [count(t) for t in text.split(",") if t.strip()]


def unit_rows(x: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit L2 norm, in place when ``x`` is already float32."""
    x = np.asarray(x, dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def clustered_unit_vectors(n: int, centers: np.ndarray, noise: float, rng: np.random.Generator,
                           out: np.ndarray | None = None) -> np.ndarray:
    """``n`` unit rows, each a uniformly chosen centre plus isotropic Gaussian noise of std ``noise`` per
    dimension; drawn GENERATE_CHUNK_ROWS at a time so the temporaries stay small (``out`` may be a view)."""
    d = centers.shape[1]
    out = np.empty((n, d), np.float32) if out is None else out
    for s in range(0, n, GENERATE_CHUNK_ROWS):
        m = min(GENERATE_CHUNK_ROWS, n - s)
        x = centers[rng.integers(0, len(centers), m)] + noise * rng.standard_normal((m, d), dtype=np.float32)
        out[s : s + m] = unit_rows(x)
    return out


@dataclass(frozen=True)
class LatentMixture:
    """Paired image/text-like unit vectors with low intrinsic dimension, as encoder embeddings have.

    A latent z in R^latent_dim is drawn from a mixture of ``components`` Gaussians (unit-variance centres,
    ``spread`` around them); each modality sees z through its own random orthonormal projection into
    R^dim plus isotropic noise of std ``noise`` per dimension. Neighbours are decided in the latent space,
    so an index has real list boundaries to get wrong (an isotropic Gaussian mixture in 512-d is
    trivially easy for IVF: every neighbour sits in the query's own cluster).
    """

    dim: int = 512
    latent_dim: int = 64
    components: int = 100
    spread: float = 0.5
    noise: float = 0.05
    seed: int = 0

    def _parts(self):
        rng = np.random.default_rng(self.seed)
        centres = rng.standard_normal((self.components, self.latent_dim), dtype=np.float32)
        proj = [np.linalg.qr(rng.standard_normal((self.dim, self.latent_dim)))[0].T.astype(np.float32)
                for _ in range(2)]
        return centres, proj

    def sample(self, n: int, rng: np.random.Generator, other_noise: float | None = None,
               modalities: int = 2) -> list[np.ndarray]:
        """``modalities`` row-aligned [n, dim] unit matrices (first: "image", second: "text") of the same
        latents; the second gets ``other_noise`` instead of ``noise`` when given (e.g. a pseudo-embedding)."""
        centres, proj = self._parts()
        outs = [np.empty((n, self.dim), np.float32) for _ in range(modalities)]
        for s in range(0, n, GENERATE_CHUNK_ROWS):
            m = min(GENERATE_CHUNK_ROWS, n - s)
            z = centres[rng.integers(0, len(centres), m)] + self.spread * rng.standard_normal(
                (m, self.latent_dim), dtype=np.float32)
            for j, out in enumerate(outs):
                noise = other_noise if (j == 1 and other_noise is not None) else self.noise
                out[s : s + m] = unit_rows(z @ proj[j] + noise * rng.standard_normal((m, self.dim), dtype=np.float32))
        return outs


@dataclass
class Target:
    """A stated goal: ``value`` against ``threshold`` (at least, or at most)."""

    name: str
    value: float
    threshold: float
    at_least: bool = True
    unit: str = ""

    @property
    def met(self) -> bool:
        return self.value >= self.threshold if self.at_least else self.value <= self.threshold

    def to_dict(self) -> dict:
        return {"target": self.name, "value": self.value, "threshold": self.threshold,
                "comparison": ">=" if self.at_least else "<=", "unit": self.unit, "met": self.met}

    def __str__(self) -> str:
        op = ">=" if self.at_least else "<="
        return (f"[{'MET' if self.met else 'NOT MET'}] {self.name}: {self.value:.4g}{self.unit} "
                f"(target {op} {self.threshold:g}{self.unit})")


def report(name: str, tables: dict[str, tuple[list[dict], list[str]]], payload: dict,
           targets: list[Target] = ()) -> Path:
    """Print each titled table and the targets, and write everything to ``bench/results/<name>.json``."""
    for title, (rows, columns) in tables.items():
        print(f"\n{title}\n{table(rows, columns)}")
    if targets:
        print("\n" + "\n".join(str(t) for t in targets))
    payload = {**payload, "tables": {title: {"columns": cols, "rows": rows} for title, (rows, cols) in tables.items()},
               "targets": [t.to_dict() for t in targets]}
    path = write_results(name, payload)
    print("written", path)
    return path


def render_markdown(path: Path) -> str:
    """A result file's tables and targets as markdown (what the script printed), for docs/benchmarks.md."""
    data = json.loads(Path(path).read_text())
    out = [f"### {data['benchmark']}", "", f"Measured {data['when']}; load average (1/5/15 min) at the end: "
           f"{data.get('provenance', {}).get('load_avg_1_5_15_min')}.", ""]
    tabs = data.get("tables") or ({data["benchmark"]: data["rows"]} if data.get("rows") else {})
    for title, tab in tabs.items():
        rows = tab["rows"] if isinstance(tab, dict) else tab
        cols = tab["columns"] if isinstance(tab, dict) else list(dict.fromkeys(k for r in rows for k in r))
        out += [f"**{title}**", "", table(rows, cols), ""]
    for t in data.get("targets", []):
        verdict = "met" if t["met"] else "NOT met"
        out.append(f"- {verdict}: {t['target']}: {t['value']:.4g}{t['unit']} (target {t['comparison']} "
                   f"{t['threshold']:g}{t['unit']})")
    return "\n".join(out).rstrip() + "\n"


def worker_pythonpath() -> str:
    """``PYTHONPATH`` with this checkout first: Ray's workers inherit the driver's environment, and must import this
    checkout (a shared virtual environment's editable install may point at another clone)."""
    return os.pathsep.join(dict.fromkeys([str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]))


def start_local_ray(num_cpus: int, temp_dir: str, object_store_bytes: int, workers_kept: int | None = None) -> float:
    """A local Ray instance whose workers import this checkout, no dashboard (the tests' session cluster and the
    benchmarks'); ``workers_kept``: idle workers Ray keeps for the next tasks (``num_workers_soft_limit``). Returns
    the seconds it took to start."""
    import ray

    os.environ["PYTHONPATH"] = worker_pythonpath()
    t0 = time.perf_counter()
    ray.init(num_cpus=num_cpus, object_store_memory=object_store_bytes, include_dashboard=False, log_to_driver=False,
             ignore_reinit_error=True, _temp_dir=temp_dir,
             _system_config={"num_workers_soft_limit": workers_kept} if workers_kept else None)
    return time.perf_counter() - t0


def start_cluster(head: dict, nodes: list[dict], object_store_bytes: int | None = None):
    """A simulated multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: one raylet per node, fake
    GPUs, no dashboard): a head of ``head``'s resources and one node per entry of ``nodes`` (``add_node`` keywords),
    each with ``object_store_bytes`` unless the entry says otherwise. Returns it once every node has joined."""
    from ray.cluster_utils import Cluster

    store = {} if object_store_bytes is None else {"object_store_memory": object_store_bytes}
    cluster = Cluster(initialize_head=True, head_node_args={**store, **head, "include_dashboard": False})
    for node in nodes:
        cluster.add_node(**{**store, **node})
    cluster.wait_for_nodes()
    return cluster


def wait_healthy(proc, url: str, log: Path, timeout_s: float) -> float:
    """Wait for a ``rag4dmc serve`` process to answer ``/healthz`` with 200; returns the seconds it took. Raises,
    with the end of its log, when it exits first or ``timeout_s`` passes."""
    import requests

    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"rag4dmc serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return time.monotonic() - t0
        except requests.RequestException:
            pass
        if time.monotonic() - t0 >= timeout_s:
            raise TimeoutError(f"no /healthz 200 within {timeout_s:g} s:\n{log.read_text()[-3000:]}")
        time.sleep(1)
