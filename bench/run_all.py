"""Run every benchmark, one after another (they would disturb each other's timings side by side).

Each script prints its tables and writes ``bench/results/<name>.json``; this runner adds
``bench/results/run_all.json`` with each script's command, exit status and wall time, and
``bench/results/latest.md``: every result file's tables and targets in markdown (for docs/benchmarks.md).

    python bench/run_all.py            # full sizes (hours on a 2-core machine)
    python bench/run_all.py --quick    # small sizes, minutes: checks that every script runs
    python bench/run_all.py --only retrieval,kmeans
    python bench/run_all.py --render        # only rewrite latest.md from the result files there
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import REPO, RESULTS, render_markdown, report  # noqa: E402

BENCH = Path(__file__).resolve().parent
# Sizes per script: the full run answers the questions of the benchmarks' issue; quick runs the same code
# on small inputs.
SIZES: dict[str, dict[str, list[str]]] = {
    "blas": {
        "full": ["--rows", "50000", "--kmeans-rows", "256000", "--clusters", "1000"],  # the 1M build's fit sizes
        "quick": ["--rows", "5000", "--kmeans-rows", "20000", "--clusters", "256"],
    },
    "purify": {
        "full": ["--internal", "100k", "--external", "1M", "--ref-internal", "20k", "--ref-external", "50k"],
        "quick": ["--internal", "10k", "--external", "50k", "--ref-internal", "5k", "--ref-external", "10k"],
    },
    "kmeans": {
        "full": ["--sizes", "100k,1M"],
        "quick": ["--sizes", "20k"],
    },
    "retrieval": {
        "full": ["--sizes", "100k,1M", "--queries", "2000", "--kinds", "auto,ivf,ivfpq",
                 "--nprobe-sweep", "8,16,32,64"],  # HNSW's build at 1M takes longer than the rest together
        "quick": ["--sizes", "20k", "--queries", "500", "--kinds", "auto,ivf,hnsw", "--repeats", "1",
                  "--nprobe-sweep", "8,32"],
    },
    "actors_encoders": {
        "full": ["--images", "256", "--texts", "1000"],
        "quick": ["--images", "32", "--texts", "128"],
    },
    "embed_stage": {
        "full": ["--rows", "2000", "--baseline-rows", "200"],
        "quick": ["--rows", "300", "--baseline-rows", "100"],
    },
    "actors_generators": {
        "full": ["--queries", "32", "--n", "4"],
        "quick": ["--queries", "8", "--n", "2"],
    },
    "real_data": {
        "full": [],  # every emoji, 5 repeats at missing rates 0.3 / 0.5 / 0.7
        "quick": ["--limit", "500", "--repeats", "2", "--rates", "0.5", "--eval-pairs", "200",
                  "--work", "runs/real_data_quick"],
    },
    "pipeline": {
        "full": ["--sizes", "1000,5000,20000", "--baseline-rows", "250", "--loop-max-rows", "5000"],
        "quick": ["--sizes", "300", "--baseline-rows", "100", "--kb-internal", "150", "--kb-external", "150",
                  "--loop-threads", "1"],
    },
}
# What the Makefile exports for every entry point: no model hub, no tokenizer threads, no uv runtime env.
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
             "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}


def render_all() -> Path:
    """bench/results/latest.md from every result file, in the order of SIZES."""
    files = [RESULTS / f"{name}.json" for name in (*SIZES, "run_all")]
    path = RESULTS / "latest.md"
    path.write_text("\n".join(render_markdown(f) for f in files if f.exists()))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (minutes) instead of the full ones (hours)")
    ap.add_argument("--only", type=lambda s: s.split(","), default=list(SIZES), help="comma-separated scripts")
    ap.add_argument("--render", action="store_true", help="run nothing; rewrite latest.md from the result files")
    args = ap.parse_args()
    if args.render:
        print("written", render_all())
        return
    unknown = set(args.only) - set(SIZES)
    if unknown:
        ap.error(f"unknown benchmarks {sorted(unknown)}; choose from {list(SIZES)}")
    mode = "quick" if args.quick else "full"
    env = {**os.environ, **{k: os.environ.get(k, v) for k, v in CHILD_ENV.items()}}
    rows = []
    for name in [n for n in SIZES if n in args.only]:
        cmd = [sys.executable, str(BENCH / f"{name}.py"), *SIZES[name][mode]]
        shown = " ".join(["python", f"bench/{name}.py", *SIZES[name][mode]])
        print(f"\n=== {shown}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=REPO, env=env).returncode
        rows.append({"benchmark": name, "command": shown, "exit_status": rc, "seconds": time.perf_counter() - t0})
    report("run_all", {f"run_all ({mode})": (rows, ["benchmark", "exit_status", "seconds", "command"])},
           {"mode": mode})
    print("written", render_all())
    failed = [r["benchmark"] for r in rows if r["exit_status"] != 0]
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
