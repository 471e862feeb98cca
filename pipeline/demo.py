"""``rag4dmc demo``: the whole method offline on generated data, with figures from the run."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.config import JobConfig, KBConfig, RetrievalConfig, SelectionConfig

log = logging.getLogger(__name__)


def run_demo(out: str, n_internal: int = 600, n_external: int = 1200, n_incomplete: int = 400,
             niqe_params: str | None = None, seed: int = 0) -> int:
    """Generate a corpus, build the KB, complete the incomplete split, evaluate the variants, report."""
    import ray

    from actors.encoders import create_encoder
    from pipeline.config import EncoderConfig
    from pipeline.demo_data import make_external, make_internal, write_demo_corpus
    from pipeline.evaluate import markdown_table, prepare, run_evaluation, write_report
    from pipeline.job import JobSpec, run_job
    from pipeline.kb_job import KBBuildSpec, run_kb_build

    t0 = time.perf_counter()
    root = Path(out).resolve()
    paths = write_demo_corpus(str(root / "data"), n_internal, n_external, n_incomplete, seed=seed, missing_rate=0.8)
    print(f"[1/4] demo corpus written to {root / 'data'}")
    ray.init(num_cpus=None, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    kb_cfg = KBConfig()
    kb = run_kb_build(KBBuildSpec(internal=paths["internal"], external=paths["external"], out=str(root / "kb"),
                                  cfg=kb_cfg))
    f = kb["report"].get("filter", {})
    print(f"[2/4] knowledge base {kb['version']}: {kb['rows']} entries; purification kept {f.get('kept_pairs')} "
          f"and dropped {f.get('dropped_pairs')} external pairs")
    selection = {"niqe_params": niqe_params} if niqe_params else {"image_quality": "none"}
    job_cfg = JobConfig.model_validate({"selection": selection})
    summary = run_job(JobSpec(data=paths["incomplete"], kb=str(root / "kb"), out=str(root / "completed"),
                              cfg=job_cfg))
    print(f"[3/4] completion: {summary['rows_out']} rows out ({summary['observed']} observed, "
          f"{summary['completed']} completed, {summary['failed']} failed) at {summary['rows_per_second']} rows/s")
    ray.shutdown()

    encoder = create_encoder(EncoderConfig(device="cpu"))
    complete = make_internal(n_incomplete + n_internal, seed + 100)
    external = make_external(n_external, seed)
    data = prepare(complete.select(["id", "image", "text"]), external.select(["id", "image", "text"]), 0.7,
                   encoder, seed=seed)
    niqe = None
    if niqe_params:
        from pipeline.selection import NiqeScorer

        niqe = NiqeScorer(niqe_params)
    result = run_evaluation(data, kb_cfg, RetrievalConfig(), SelectionConfig(), encoder,
                            ["drop", "direct", "vanilla", "combined", "kfa", "rag4dmc", "complete"], niqe=niqe)
    files = write_report(result, root / "report", {"missing_rate": 0.7, "seed": seed})
    noise_dropped = _noise_dropped(paths, kb)
    print("[4/4] evaluation (missing rate 0.7):\n")
    print(markdown_table(result["variants"]))
    if noise_dropped:
        print(f"\npurification: {noise_dropped}")
    print(f"\nreport: {files['html']}\nmetrics: {files['metrics']}\ncompleted data: {root / 'completed'}\n"
          f"total {time.perf_counter() - t0:.0f} s")
    (root / "demo_summary.json").write_text(json.dumps({"kb": {k: v for k, v in kb.items() if k != "report"},
                                                        "completion": summary, "report": files}, indent=2))
    return 0


def _noise_dropped(paths: dict, kb: dict) -> str:
    """How many planted-noise external rows the purification removed (the truth is known here)."""
    from pipeline.kb import local_copy

    try:
        entries = pq.read_table(local_copy(kb["out"]) / "entries.parquet", columns=["id", "source"]).to_pandas()
        truth_ext = pq.read_table(Path(paths["truth"]) / "external.parquet").to_pandas()
    except (OSError, FileNotFoundError):
        return ""
    kept = set(entries[entries.source == "external"].id)
    noise = truth_ext[truth_ext.planted_noise]
    clean = truth_ext[~truth_ext.planted_noise]
    return (f"{(~noise.id.isin(kept)).sum()} of {len(noise)} planted-noise rows dropped, "
            f"{clean.id.isin(kept).sum()} of {len(clean)} clean rows kept")
