"""The out-of-core KB build at LAION-like sizes, from precomputed embeddings in the clip-retrieval layout.

An external corpus is generated on disk in the layout LAION publishes (``img_emb/``, ``text_emb/``,
``metadata/`` shards of float16 vectors; metadata with ``key``, ``caption`` and ``url``), with the
low-intrinsic-dimension structure of :class:`bench.common.LatentMixture` (two components of which the
internal corpus has none: the filter has something to drop), plus internal pairs in the same layout. The
largest size is generated once; smaller sizes link its first shards. Each ``url`` points at a real image:
one of a few hundred Noto emoji drawings written to disk, so completion fetches real files by reference.

For each size the script runs ``rag4dmc kb build --internal-embeddings I --external-embeddings E --out KB``
as its own process and reports per stage the wall time and the largest task's peak RSS (from the build's
report), the driver's peak RSS (sampled), the recall@10 of the chosen index against exact search, and the
KB's size on disk per row. Then it runs ``rag4dmc complete`` on ``--complete-rows`` incomplete emoji rows
against the largest KB and reports its throughput and the example images fetched per completed row.

    python bench/kb_scale.py                        # 1M and 10M external rows, 100k internal
    python bench/kb_scale.py --sizes 1m,3m --internal 100k
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import LatentMixture, Target, count, counts, report, write_results  # noqa: E402
from rag4dmc.pipeline.io import embedding_layout as layout  # noqa: E402

DIM = 512  # open_clip ViT-B-32's embedding size (the encoder the KB is declared with; no weights are needed)
SHARD_ROWS = 250_000  # rows per generated layout shard (clip-retrieval writes shards of this order)
IMAGE_POOL = 256  # distinct real images the generated urls point at
OFF_DOMAIN = 2  # mixture components only the external corpus has
COMPONENTS = 40
CONFIG = {"encoder": {"backend": "open_clip", "model_name": "ViT-B-32"},
          "calibration": {"enabled": False}}  # the calibration's cost is bounded by calibration.max_rows, not N


def image_pool(folder: Path) -> list[str]:
    """Paths of IMAGE_POOL real emoji drawings on disk (the urls of the generated metadata)."""
    from bench.emoji import emoji_pairs

    folder.mkdir(parents=True, exist_ok=True)
    pairs = emoji_pairs(limit=IMAGE_POOL)
    paths = []
    for i, image in enumerate(pairs.column("image").to_pylist()):
        p = folder / f"{i:04d}.png"
        if not p.exists():
            p.write_bytes(image)
        paths.append(str(p))
    return paths


def generate(root: Path, rows: int, prefix: str, seed: int, images: list[str], components: range) -> None:
    """A layout of ``rows`` pairs (float16) at ``root``; shards already there are kept."""
    mix = LatentMixture(dim=DIM, latent_dim=64, components=COMPONENTS, seed=0)
    done = layout.written_numbers(str(root))
    for i, start in enumerate(range(0, rows, SHARD_ROWS)):
        number = f"{i:05d}"
        if number in done:
            continue
        n = min(SHARD_ROWS, rows - start)
        rng = np.random.default_rng([seed, i])
        image, text = _sample(mix, n, rng, components)
        ids = np.arange(start, start + n)
        meta = pa.table({"key": [f"{prefix}{j:09d}" for j in ids], "caption": [f"{prefix} caption {j}" for j in ids],
                         "url": [images[j % len(images)] for j in ids]})
        layout.write_embedding_shard(str(root), number, image, text, meta)
        print(f"  {root.name}: shard {number} ({start + n:,} rows)", flush=True)


def _sample(mix: LatentMixture, n: int, rng: np.random.Generator, components: range):
    """``mix.sample`` restricted to some components (the internal corpus lacks the off-domain ones)."""
    centres, proj = mix._parts()
    which = rng.choice(np.asarray(components), n)
    z = centres[which] + mix.spread * rng.standard_normal((n, mix.latent_dim), dtype=np.float32)
    out = []
    for p in proj:
        x = z @ p + mix.noise * rng.standard_normal((n, DIM), dtype=np.float32)
        out.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    return out


def link_prefix(big: Path, small: Path, rows: int) -> None:
    """``small``: the first shards of ``big`` holding ``rows`` rows, as symbolic links."""
    if rows % SHARD_ROWS:
        raise SystemExit(f"--sizes below the largest must be multiples of {SHARD_ROWS:,} rows (got {rows:,})")
    if small.exists():
        return
    for folder in ("img_emb", "text_emb", "metadata"):
        (small / folder).mkdir(parents=True)
    for i in range(-(-rows // SHARD_ROWS)):
        for folder, name in (("img_emb", f"img_emb_{i:05d}.npy"), ("text_emb", f"text_emb_{i:05d}.npy"),
                             ("metadata", f"metadata_{i:05d}.parquet")):
            os.symlink(big / folder / name, small / folder / name)


def run_sampled(cmd: list[str], env: dict, log: Path) -> tuple[float, int]:
    """Run ``cmd``; its wall time and its own peak RSS (the driver: sampled every 0.2 s)."""
    peak = [0]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        ps = psutil.Process(proc.pid)
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                try:
                    peak[0] = max(peak[0], ps.memory_info().rss)
                except psutil.Error:
                    return
                stop.wait(0.2)

        t = threading.Thread(target=sample, daemon=True)
        t0 = time.perf_counter()
        t.start()
        rc = proc.wait()
        stop.set()
    if rc:
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}); see {log}")
    return time.perf_counter() - t0, peak[0]


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=counts, default=[1_000_000, 10_000_000], help="external rows per build")
    ap.add_argument("--internal", type=count, default=100_000, help="internal pairs")
    ap.add_argument("--complete-rows", type=count, default=5_000, help="incomplete rows completed (0: skip)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/rag4dmc-kb-scale"))
    args = ap.parse_args()
    work = args.work
    rag4dmc = str(Path(sys.executable).with_name("rag4dmc"))
    images = image_pool(work / "images")
    (work / "kb.yaml").write_text(json.dumps(CONFIG))  # YAML is a superset of JSON
    print(f"generating {args.internal:,} internal and {max(args.sizes):,} external rows under {work}", flush=True)
    generate(work / "internal", args.internal, "int", 1, images, range(COMPONENTS - OFF_DOMAIN))
    generate(work / f"external-{max(args.sizes)}", max(args.sizes), "ext", 2, images, range(COMPONENTS))
    rows, stage_rows, targets, last_kb = [], [], [], None
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    for n in sorted(args.sizes):
        ext = work / f"external-{n}"
        link_prefix(work / f"external-{max(args.sizes)}", ext, n)
        kb = work / f"kb-{n}"
        shutil.rmtree(kb, ignore_errors=True)
        if last_kb is not None:
            shutil.rmtree(last_kb)  # measured: only the largest KB is kept (for completion); disk for this one
        print(f"building the KB over {n:,} external rows", flush=True)
        wall, driver = run_sampled([rag4dmc, "kb", "build", "--internal-embeddings", str(work / "internal"),
                                    "--external-embeddings", str(ext), "--out", str(kb), "--config",
                                    str(work / "kb.yaml")], env, work / f"build-{n}.log")
        rep = json.loads((kb / "report.json").read_text())
        kb_rows = rep["kb_rows"]
        for stage, s in rep["stages"].items():
            stage_rows.append({"external rows": n, "stage": stage, "seconds": s["seconds"],
                               "us/row": round(1e6 * s["seconds"] / (n + args.internal), 2),
                               "task peak GiB": round(s["task_peak_rss_bytes"] / 2**30, 2),
                               "task peak anon GiB": round(s.get("task_peak_anon_bytes", 0) / 2**30, 2) or ""})
        task_peak = max(s["task_peak_rss_bytes"] for s in rep["stages"].values())
        index_anon = rep["stages"]["index"].get("task_peak_anon_bytes", 0)
        row = {"external rows": n, "kb rows": kb_rows, "kind": rep["index_kind"], "wall s": round(wall, 1),
               "us/row": round(1e6 * wall / (n + args.internal), 2), "driver peak GiB": round(driver / 2**30, 2),
               "task peak GiB": round(task_peak / 2**30, 2), "index task anon GiB": round(index_anon / 2**30, 2),
               "recall@10 image": rep["recall"]["image"], "recall@10 text": rep["recall"]["text"],
               "nprobe": rep["recall"].get("nprobe"), "rerank": rep["recall"]["rerank_factor"],
               "disk B/row": round(du(kb) / kb_rows, 1),
               "kept external": rep["filter"]["kept_pairs"]}
        rows.append(row)
        # on disk as soon as measured: a run stopped during a later size keeps this one's figures
        write_results("kb_scale", {"benchmark": "kb_scale", "partial": True, "internal_rows": args.internal,
                                   "builds": rows, "stages": stage_rows})
        targets += [Target(f"driver peak RSS at {n:,} rows", row["driver peak GiB"], 2.0, at_least=False, unit=" GiB"),
                    Target(f"largest task's peak RSS at {n:,} rows", row["task peak GiB"], 6.0, at_least=False,
                           unit=" GiB"),
                    *([Target(f"index task's peak anonymous memory at {n:,} rows (RSS less mapped files)",
                              row["index task anon GiB"], 6.0, at_least=False, unit=" GiB")] if index_anon else []),
                    Target(f"image recall@10 at {n:,} rows", row["recall@10 image"], 0.9),
                    Target(f"text recall@10 at {n:,} rows", row["recall@10 text"], 0.9)]
        last_kb = kb
    if len(rows) > 1:
        targets.append(Target(f"build time per row at {rows[-1]['external rows']:,} / at {rows[0]['external rows']:,}",
                              rows[-1]["us/row"] / rows[0]["us/row"], 1.0, at_least=False, unit="x"))
    completion = []
    if args.complete_rows and last_kb is not None:
        completion.append(complete(work, last_kb, args.complete_rows, rag4dmc, env))
    report("kb_scale", {
        "KB build per size (precomputed embeddings in the clip-retrieval layout)": (rows, list(rows[0])),
        "per stage": (stage_rows, list(stage_rows[0])),
        **({"rag4dmc complete against the largest KB": (completion, list(completion[0]))} if completion else {}),
    }, {"benchmark": "kb_scale", "internal_rows": args.internal, "dim": DIM, "config": CONFIG}, targets)


def complete(work: Path, kb: Path, n: int, rag4dmc: str, env: dict) -> dict:
    """``rag4dmc complete`` on n incomplete emoji rows; throughput and example images fetched per row."""
    from bench.emoji import emoji_pairs
    from rag4dmc.pipeline.io.datasets import write_parquet

    pairs = emoji_pairs()
    rng = np.random.default_rng(0)
    take = rng.choice(pairs.num_rows, n, replace=pairs.num_rows < n)
    table = pairs.take(pa.array(take))
    drop_text = rng.random(n) < 0.5
    data = pa.table({"id": [f"q{i}" for i in range(n)], "image": [b if d else None for d, b in zip(drop_text, table["image"].to_pylist())],
                     "text": [None if d else t for d, t in zip(drop_text, table["text"].to_pylist())]})
    shutil.rmtree(work / "complete", ignore_errors=True)
    for j, s in enumerate(range(0, n, 1000)):
        write_parquet(data.slice(s, 1000), str(work / "complete" / "data" / f"part-{j:03d}.parquet"))
    tmp = work / "complete" / "tmp"  # a fresh example-image cache: its files are the images fetched
    tmp.mkdir(parents=True)
    wall, _ = run_sampled([rag4dmc, "complete", "--data", str(work / "complete" / "data"), "--kb", str(kb),
                           "--out", str(work / "complete" / "out")], {**env, "TMPDIR": str(tmp)},
                          work / "complete.log")
    summary = json.loads((work / "complete" / "out" / "summary.json").read_text())
    # the cache's files are the distinct images fetched; the urls point at IMAGE_POOL files, so repeats of one
    # image are cache hits and this counts fetches from storage, not uses
    fetched = sum(1 for _ in (tmp / "rag4dmc-example-images").glob("[0-9a-f]*"))
    return {"rows": n, "wall s": round(wall, 1), "rows/s": round(n / wall, 2), "completed": summary["completed"],
            "failed": summary["failed"], "images completed": summary.get("completed_image", 0),
            "example images fetched": fetched,
            "fetched per completed row": round(fetched / max(1, summary["completed"]), 3),
            "embed actor s/row": summary.get("actor_seconds_per_completed_row", {}).get("embed")}


if __name__ == "__main__":
    main()
