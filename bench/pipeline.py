"""The full ``complete`` job on Ray Data against the same stages in a plain single-process loop.

Both sides run the same code on the same generated data (``rag4dmc.pipeline.demo.corpus``) and knowledge base
(built once by ``rag4dmc.pipeline.job.kb_runner``): lite encoders, fusion retrieval, the nearest-neighbour generators
and candidate selection. The job is ``rag4dmc.pipeline.job.runner.run_job``; the loop reads each input shard with the
job's datasource code and pushes batches of the job's batch size through the job's stage functions and
actor classes (route, then per direction decode or check -> embed -> retrieve -> caption or paint, then
finalize), then writes one parquet file per shard. Torch and FAISS in the loop get the thread count that
ran the baseline fastest (``--loop-threads``); Ray gives each fractional-CPU actor one thread.

Start-up (Ray's actors and model loads, the KB load) is not throughput: each size N runs after a small
baseline run of ``--baseline-rows`` rows, and the steady-state time per row is
``(T(N) - T(baseline)) / (N - baseline)``, for the job and the loop alike. Time to first output (the
first parquet file written) and the baseline run's wall time are reported beside it. Job and loop run
back to back for every size, ``--repeats`` times, and the median is kept.

    python bench/pipeline.py                                  # N = 1,000 / 5,000 / 20,000
    python bench/pipeline.py --sizes 500,2000 --baseline-rows 100
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import Target, count, counts, measure, report, start_local_ray  # noqa: E402
from rag4dmc.pipeline.config import JobConfig, KBConfig, MappingConfig  # noqa: E402

RAY_OBJECT_STORE_BYTES = 1024**3  # the object store holds a few batches of 128px PNGs; 1 GiB is plenty
ROWS_PER_SHARD = 1000  # input parquet shard size (one Ray read task per shard)
MISSING_RATE = 1.0  # fraction of generated rows lacking a modality (the rest are complete pairs passing through)
KB_MAPPING_EPOCHS = 30  # the mapping MLP's quality does not change throughput; keep the KB build short
FIRST_OUTPUT_POLL_S = 0.1
TARGET_N = 5_000
TARGET_RATIO = 1.25  # job wall time / loop wall time, end to end, at TARGET_N, at most
TARGET_STEADY_RATIO = 1.1  # job seconds per row / loop seconds per row in the steady state, at every N, at most


def _installed_niqe() -> str | None:
    """NIQE's parameters where `rag4dmc setup` installs them (t2i candidates are then scored with NIQE)."""
    from rag4dmc.pipeline.setup_data import NiqeParamsMissing, niqe_params_path

    try:
        return niqe_params_path(None)
    except NiqeParamsMissing:
        return None


def job_config(niqe_params: str | None) -> JobConfig:
    """The job's defaults; NIQE scoring of image candidates when its parameters are at hand."""
    selection = {"niqe_params": niqe_params} if niqe_params else {"image_quality": "none"}
    return JobConfig.model_validate({"selection": selection})


def start_ray(num_cpus: int, temp_dir: str) -> float:
    """A local Ray instance like the tests' (``bench.common.start_local_ray``), without progress bars; returns its
    start time."""
    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    seconds = start_local_ray(num_cpus, temp_dir, RAY_OBJECT_STORE_BYTES)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return seconds


def build_kb(root: Path, n_internal: int, n_external: int) -> tuple[str, float, int]:
    """Generate internal and external pairs and build the KB with the KB job; (uri, seconds, rows)."""
    from rag4dmc.pipeline.demo.corpus import make_external, make_internal, write_split
    from rag4dmc.pipeline.job.kb_runner import KBBuildSpec, run_kb_build

    write_split(make_internal(n_internal).select(["id", "image", "text"]), f"{root}/internal")
    write_split(make_external(n_external).select(["id", "image", "text"]), f"{root}/external")
    cfg = KBConfig(mapping=MappingConfig(max_epochs=KB_MAPPING_EPOCHS))
    t0 = time.perf_counter()
    built = run_kb_build(KBBuildSpec(internal=f"{root}/internal", external=f"{root}/external", out=f"{root}/kb",
                                     cfg=cfg))
    return f"{root}/kb", time.perf_counter() - t0, built["rows"]


def write_data(folder: Path, n: int, seed: int, missing_rate: float) -> None:
    """``n`` rows, ``missing_rate`` of them incomplete (half of those lack the image, half the text), in
    ROWS_PER_SHARD-row parquet shards."""
    from rag4dmc.pipeline.demo.corpus import make_incomplete, write_split

    table = make_incomplete(n, seed=seed, missing_rate=missing_rate).select(["id", "image", "text"])
    write_split(table, str(folder), -(-n // ROWS_PER_SHARD))


class FirstFile:
    """Watches a folder from a thread and records when the first parquet file appears in it."""

    def __init__(self, folder: Path):
        self.folder, self.t0, self.seconds = folder, time.perf_counter(), None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set() and self.seconds is None:
            if self.folder.is_dir() and any(self.folder.glob("**/*.parquet")):
                self.seconds = time.perf_counter() - self.t0
            self._stop.wait(FIRST_OUTPUT_POLL_S)

    def stop(self) -> float | None:
        self._stop.set()
        self._thread.join()
        return self.seconds


def run_ray_job(data: Path, kb: str, out: Path, cfg: JobConfig) -> dict:
    """``rag4dmc.pipeline.job.runner.run_job`` end to end: wall seconds, time to first output file, rows out."""
    from rag4dmc.pipeline.job.runner import JobSpec, run_job
    from rag4dmc.pipeline.job.writer import DATA_DIR

    shutil.rmtree(out, ignore_errors=True)
    watch = FirstFile(out / DATA_DIR)
    with measure() as m:
        summary = run_job(JobSpec(data=str(data), kb=kb, out=str(out), cfg=cfg))
    return {"seconds": m.seconds, "first_output_s": watch.stop(), "rows": summary["rows_out"],
            "completed": summary["completed"], "failed": summary["failed"], "observed": summary["observed"],
            "actor_seconds_per_row": summary["actor_seconds_per_completed_row"]}


class PlainLoop:
    """The job's stages called in this process, one batch at a time (``rag4dmc.pipeline.job.local_chain``: each
    shard read and routed by the job's reader code, each direction's rows through its stages, then ``finalize``);
    one parquet file per shard: the work of ``rag4dmc.pipeline.job.mapper.build_plan`` without Ray."""

    def __init__(self, kb: str, cfg: JobConfig):
        from rag4dmc.actors.preprocess import CPU_TASK
        from rag4dmc.pipeline.job.local_chain import LocalChain

        self.chain = LocalChain(kb, cfg)
        self.batch_size = CPU_TASK.batch_size

    @staticmethod
    def set_threads(n: int) -> None:
        """Threads for torch and FAISS in this process (Ray gives each fractional-CPU actor one)."""
        import faiss
        import torch

        torch.set_num_threads(n)
        faiss.omp_set_num_threads(n)

    def run(self, data: Path, out: Path) -> dict:
        from rag4dmc.pipeline.io import datasets

        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        root = str(data).rstrip("/")
        first, status = None, []
        t0 = time.perf_counter()
        with measure() as m:
            for j, shard in enumerate(datasets.list_shards(str(data))):
                done = self.chain.shard(shard, root, self.batch_size)
                pq.write_table(done, out / f"part-{j:05d}.parquet")
                first = first if first is not None else time.perf_counter() - t0
                status += done.column("status").to_pylist()
        return {"seconds": m.seconds, "first_output_s": first, "rows": len(status),
                **{s: status.count(s) for s in ("completed", "failed", "observed")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=counts, default=counts("1000,5000,20000"), help="rows per run (N sweep)")
    ap.add_argument("--baseline-rows", type=count, default=250, help="small run subtracted to remove start-up")
    ap.add_argument("--kb-internal", type=count, default=1000, help="internal pairs in the knowledge base")
    ap.add_argument("--kb-external", type=count, default=1000, help="external pairs (before purification)")
    ap.add_argument("--missing-rate", type=float, default=MISSING_RATE, help="fraction of rows to complete")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each size per side; the median is kept")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs given to Ray")
    ap.add_argument("--niqe-params", default=_installed_niqe(),
                    help="NIQE parameter file; without one, image candidates are ranked by cosine only")
    ap.add_argument("--loop-threads", type=lambda t: [int(x) for x in t.split(",")], default=[1, os.cpu_count()],
                    help="thread counts tried for the plain loop on the baseline run; the fastest is used")
    ap.add_argument("--loop-max-rows", type=count, default=None,
                    help="run the plain loop only up to this N (the job runs every size); default: every size")
    ap.add_argument("--kb", default=None, help="an existing knowledge base to use instead of building one")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-run execution chatter
    import ray

    work = Path(args.workdir or tempfile.mkdtemp(prefix="rag4dmc-bench-pipeline-"))
    cfg = job_config(args.niqe_params)
    try:
        ray_start_s = start_ray(args.num_cpus, str(work / "ray"))
        if args.kb:
            kb, kb_seconds, kb_rows = args.kb, None, None
        else:
            kb, kb_seconds, kb_rows = build_kb(work / "kbdata", args.kb_internal, args.kb_external)
        with measure() as m_loop_init:
            loop = PlainLoop(kb, cfg)
        sizes = sorted({args.baseline_rows, *args.sizes})
        for i, n in enumerate(sizes):
            write_data(work / f"data-{n}", n, seed=1 + i, missing_rate=args.missing_rate)

        # The plain loop's best thread count on this machine (on a busy machine, two threads per process
        # can be much slower than one for small torch ops such as NIQE's): run the baseline with each.
        calibration = []
        for threads in args.loop_threads:
            loop.set_threads(threads)
            r = loop.run(work / f"data-{args.baseline_rows}", work / "out-loop")
            calibration.append({"threads": threads, "N": args.baseline_rows, "seconds": r["seconds"],
                                "rows_per_s": args.baseline_rows / r["seconds"]})
            print(f"plain loop with {threads} thread(s), N={args.baseline_rows}: {r['seconds']:.1f} s", flush=True)
        loop_threads = min(calibration, key=lambda c: c["seconds"])["threads"]
        loop.set_threads(loop_threads)

        runs: dict[tuple[str, int], list[dict]] = {}
        for rep in range(args.repeats):
            for n in sizes:  # job and loop back to back on the same data
                sides = [("ray job", lambda n=n: run_ray_job(work / f"data-{n}", kb, work / "out-job", cfg))]
                if args.loop_max_rows is None or n <= args.loop_max_rows:
                    sides.append(("plain loop", lambda n=n: loop.run(work / f"data-{n}", work / "out-loop")))
                for side, fn in sides:
                    r = fn()
                    r["load_avg_1min"] = os.getloadavg()[0]
                    runs.setdefault((side, n), []).append(r)
                    print(f"repeat {rep} {side:10s} N={n:6d}: {r['seconds']:.1f} s, {r['rows']} rows "
                          f"({r['completed']} completed, {r['observed']} observed, {r['failed']} failed), "
                          f"load {r['load_avg_1min']:.1f}",
                          flush=True)
    finally:
        ray.shutdown()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    def med(side: str, n: int, key: str) -> float | None:
        vals = [r[key] for r in runs[(side, n)] if r[key] is not None]
        return statistics.median(vals) if vals else None

    rows, per_row = [], {}
    base = args.baseline_rows
    for n in sorted(args.sizes):
        for side in ("ray job", "plain loop"):
            if (side, n) not in runs:
                continue
            t, t0 = med(side, n, "seconds"), med(side, base, "seconds")
            steady = (t - t0) / (n - base) if n > base else None
            per_row[(side, n)] = steady
            spread = [r["seconds"] for r in runs[(side, n)]]
            rows.append({"side": side, "N": n, "seconds": t, "min_s": min(spread), "max_s": max(spread),
                         "rows_per_s_end_to_end": n / t,
                         "steady_rows_per_s": 1 / steady if steady else None,
                         "first_output_s": med(side, n, "first_output_s"), "baseline_run_s": t0,
                         **{k: runs[(side, n)][0][k] for k in ("completed", "observed", "failed")}})
    ratios = [{"N": n, "job_s_per_row": per_row[("ray job", n)], "loop_s_per_row": per_row[("plain loop", n)],
               "ratio_steady": per_row[("ray job", n)] / per_row[("plain loop", n)],
               "ratio_end_to_end": med("ray job", n, "seconds") / med("plain loop", n, "seconds")}
              for n in sorted(args.sizes) if per_row.get(("ray job", n)) and per_row.get(("plain loop", n))]
    targets = [Target(f"ray job / plain loop, end to end (start-up included) at N={TARGET_N}",
                      r["ratio_end_to_end"], TARGET_RATIO, at_least=False, unit="x")
               for r in ratios if r["N"] == TARGET_N]
    targets += [Target(f"ray job / plain loop, steady-state time per row at N={r['N']}", r["ratio_steady"],
                       TARGET_STEADY_RATIO, at_least=False, unit="x") for r in ratios]
    startup = {"ray_init_s": ray_start_s, "kb_build_s": kb_seconds, "kb_rows": kb_rows,
               "plain_loop_init_s": m_loop_init.seconds}
    n_max = max(args.sizes)
    stages = [{"stage": stage, "N": n_max, "actor_seconds_per_completed_row": secs}
              for stage, secs in runs[("ray job", n_max)][0]["actor_seconds_per_row"].items()]
    tables = {"plain loop thread calibration (baseline run)": (calibration, ["threads", "N", "seconds", "rows_per_s"]),
              "ray job: actor-seconds per completed row by stage (summary.json)":
                  (stages, ["stage", "N", "actor_seconds_per_completed_row"])}
    kb_note = f"{kb_seconds:.1f} s ({kb_rows} rows)" if kb_seconds is not None else f"reused {kb}"
    print(f"\nstart-up: Ray init {ray_start_s:.1f} s, KB build {kb_note}, "
          f"plain loop model + KB load {m_loop_init.seconds:.1f} s; NIQE: {args.niqe_params or 'off'}; "
          f"plain loop threads: {loop_threads}")
    report("pipeline", {
        **tables,
        "throughput (steady state = (T(N) - T(baseline)) / (N - baseline))":
            (rows, ["side", "N", "seconds", "min_s", "max_s", "rows_per_s_end_to_end", "steady_rows_per_s",
                    "first_output_s",
                    "baseline_run_s", "completed", "observed", "failed"]),
        "ray job against the plain loop": (ratios, ["N", "job_s_per_row", "loop_s_per_row", "ratio_steady",
                                                    "ratio_end_to_end"]),
    }, {"args": vars(args), "startup": startup, "num_cpus": args.num_cpus, "rows_per_shard": ROWS_PER_SHARD,
        "plain_loop_threads": loop_threads, "niqe": bool(args.niqe_params),
        "runs": {f"{side}:{n}": r for (side, n), r in runs.items()}}, targets)


if __name__ == "__main__":
    main()
