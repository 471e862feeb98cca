"""The job's image-embedding stage on real photos, end to end on Ray: what ``rag4dmc complete`` sustains on i2t rows.

``bench/actors_encoders.py`` times the lite image tower alone in one process. This script runs the whole
``complete`` job (``rag4dmc.pipeline.job.runner.run_job``, the job's defaults: lite encoders, fusion retrieval, the
nearest-neighbour caption generator, candidate selection) on rows that hold only an image: JPEG photos of
640x480 (random crops of scikit-image's sample photos, as in ``bench/actors_encoders.py``), so every row is
decoded and resized, embedded by the image tower, retrieved and captioned. The KB is ``bench/pipeline.py``'s
(1,000 internal + 1,000 external demo pairs, built with the same encoders).

Start-up is subtracted as in ``bench/pipeline.py``: a baseline run of ``--baseline-rows`` rows, then N rows;
the steady rate is ``(N - baseline) / (T(N) - T(baseline))``. The embed stage's own figure is the job's
``summary.json``: actor-seconds per completed row in ``embed`` (beside ``retrieve`` and ``generate``), so images
per actor-second.

    python bench/embed_stage.py                      # 2,000 photos, Ray on every CPU
    python bench/embed_stage.py --rows 500 --baseline-rows 100
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.actors_encoders import jpeg_photos  # noqa: E402
from bench.common import Target, count, report  # noqa: E402
from bench.pipeline import ROWS_PER_SHARD, build_kb, job_config, run_ray_job, start_ray  # noqa: E402

TARGET_IMAGES_PER_S = 40  # issue 14: the job's embed stage, end to end on 2 cores


def write_image_rows(folder: Path, n: int, seed: int) -> None:
    """``n`` rows holding only a JPEG photo (text missing: every row goes image -> text), ROWS_PER_SHARD a shard."""
    from rag4dmc.pipeline.io.datasets import write_parquet

    photos = jpeg_photos(n, seed=seed)
    table = pa.table({"id": [f"p{seed}-{i}" for i in range(n)], "image": photos, "text": pa.nulls(n, pa.string())})
    for j, s in enumerate(range(0, n, ROWS_PER_SHARD)):
        write_parquet(table.slice(s, ROWS_PER_SHARD), f"{folder}/part-{j:05d}.parquet")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=count, default=2000, help="image-only rows of the timed run")
    ap.add_argument("--baseline-rows", type=count, default=200, help="small run subtracted to remove start-up")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs given to Ray")
    ap.add_argument("--kb", default=None, help="an existing knowledge base (lite encoders) instead of building one")
    args = ap.parse_args()
    if args.rows <= args.baseline_rows:
        raise SystemExit(f"--rows ({args.rows}) must exceed --baseline-rows ({args.baseline_rows})")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    import ray

    work = Path(tempfile.mkdtemp(prefix="rag4dmc-bench-embed-"))
    cfg = job_config(None)  # i2t rows only: no image candidates, so no NIQE
    try:
        start_ray(args.num_cpus, str(work / "ray"))
        kb = args.kb or build_kb(work / "kbdata", 1000, 1000)[0]
        runs = {}
        for i, n in enumerate((args.baseline_rows, args.rows)):
            write_image_rows(work / f"data-{n}", n, seed=1 + i)
            runs[n] = run_ray_job(work / f"data-{n}", kb, work / "out", cfg)
            print(f"N={n}: {runs[n]['seconds']:.1f} s, {runs[n]['completed']} completed, {runs[n]['failed']} failed",
                  flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    base, big = runs[args.baseline_rows], runs[args.rows]
    steady = (args.rows - args.baseline_rows) / (big["seconds"] - base["seconds"])
    secs = big["actor_seconds_per_row"]
    rows = [{"N": n, "seconds": r["seconds"], "rows_per_s_end_to_end": n / r["seconds"], "completed": r["completed"],
             "failed": r["failed"]} for n, r in runs.items()]
    stages = [{"stage": s, "actor_seconds_per_row": v, "rows_per_actor_second": 1 / v if v else None}
              for s, v in secs.items()]
    report("embed_stage", {
        f"complete on image-only rows (640x480 JPEG photos), Ray on {args.num_cpus} CPUs": (
            rows, ["N", "seconds", "rows_per_s_end_to_end", "completed", "failed"]),
        f"actor-seconds per completed row by stage (N={args.rows})": (
            stages, ["stage", "actor_seconds_per_row", "rows_per_actor_second"]),
    }, {"args": vars(args), "steady_images_per_s": steady},
        [Target(f"job steady state on image-only rows, {args.num_cpus} CPUs ((N - baseline) / (T(N) - T(baseline)))",
                steady, TARGET_IMAGES_PER_S, unit=" images/s"),
         Target("embed stage alone (1 / embed actor-seconds per row)", 1 / secs["embed"], TARGET_IMAGES_PER_S,
                unit=" images/actor-s")])


if __name__ == "__main__":
    main()
