"""``rag4dmc demo``: the whole method offline on generated data, with figures from the run."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pyarrow.parquet as pq

from rag4dmc.pipeline.config import JobConfig, KBConfig

log = logging.getLogger(__name__)

DEMO_MISSING_RATE = 0.8  # of the generated incomplete split that the completion job fills in
EVAL_MISSING_RATE = 0.7  # of the internal corpus's training split in the evaluation


def run_demo(out: str, n_internal: int = 600, n_external: int = 1200, n_incomplete: int = 400,
             niqe_params: str | None = None, seed: int = 0) -> int:
    """Generate a corpus, build the KB, complete the incomplete split, evaluate the variants, report."""
    import ray

    from rag4dmc.pipeline.config import EvalConfig
    from rag4dmc.pipeline.demo.corpus import write_demo_corpus
    from rag4dmc.pipeline.evaluation.markdown import markdown_table
    from rag4dmc.pipeline.evaluation.runner import evaluate_datasets
    from rag4dmc.pipeline.job.kb_runner import KBBuildSpec, run_kb_build
    from rag4dmc.pipeline.job.runner import JobSpec, run_job

    t0 = time.perf_counter()
    root = Path(out).resolve()
    paths = write_demo_corpus(str(root / "data"), n_internal, n_external, n_incomplete, seed=seed,
                              missing_rate=DEMO_MISSING_RATE)
    print(f"[1/4] demo corpus written to {root / 'data'}")
    ray.init(num_cpus=None, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    kb_cfg = KBConfig()
    kb = run_kb_build(KBBuildSpec(internal=paths["internal"], external=paths["external"], out=str(root / "kb"),
                                  cfg=kb_cfg))
    f = kb["report"].get("filter", {})
    print(f"[2/4] knowledge base {kb['version']}: {kb['rows']} entries; purification kept {f.get('kept_pairs')} "
          f"and dropped {f.get('dropped_pairs')} external pairs")
    noise_dropped = _noise_dropped(paths, kb)
    if noise_dropped:
        print(f"      planted noise: {noise_dropped}")
    selection = {"niqe_params": niqe_params} if niqe_params else {}  # default: the copy `rag4dmc setup` installs
    job_cfg = JobConfig.model_validate({"selection": selection})
    summary = run_job(JobSpec(data=paths["incomplete"], kb=str(root / "kb"), out=str(root / "completed"),
                              cfg=job_cfg))
    print(f"[3/4] completion: {summary['rows_out']} rows out ({summary['observed']} observed, "
          f"{summary['completed']} completed, {summary['failed']} failed) at {summary['rows_per_second']} rows/s")
    ray.shutdown()

    # The evaluation is `rag4dmc evaluate --data <internal> --external <external>`: the same reader, report and files.
    eval_cfg = EvalConfig.model_validate({"encoder": {"device": "cpu"}, "selection": selection,
                                          "evaluation": {"missing_rates": [EVAL_MISSING_RATE], "seed": seed}})
    payload, files = evaluate_datasets(paths["internal"], paths["external"], str(root / "report"), eval_cfg)
    rates = ", ".join(f"{r:g}" for r in payload["missing_rates"])
    rows = payload["rows"]
    print(f"[4/4] evaluation on the internal corpus ({rows['train']} training / {rows['test']} test pairs, missing "
          f"rate {rates}) with the external corpus ({rows['external']} pairs):\n")
    print(markdown_table(payload["variants"]))
    print("\n".join(f"- {line}" for line in payload["findings"]))
    print(f"\nreport: {files['html']}\nmetrics: {files['metrics']}\ncompleted data: {root / 'completed'}\n"
          f"total {time.perf_counter() - t0:.0f} s")
    (root / "demo_summary.json").write_text(json.dumps({"kb": {k: v for k, v in kb.items() if k != "report"},
                                                        "completion": summary, "report": files}, indent=2))
    return 0


def _noise_dropped(paths: dict, kb: dict) -> str:
    """How many planted-noise external rows the purification removed (the truth is known here)."""
    from rag4dmc.pipeline.kb.store import load_entries

    try:
        entries = load_entries(kb["out"]).select(["id", "source"]).to_pandas()
        truth_ext = pq.read_table(Path(paths["truth"]) / "external.parquet").to_pandas()
    except (OSError, FileNotFoundError):
        return ""
    kept = set(entries[entries.source == "external"].id)
    noise = truth_ext[truth_ext.planted_noise]
    clean = truth_ext[~truth_ext.planted_noise]
    return (f"{(~noise.id.isin(kept)).sum()} of {len(noise)} planted-noise rows dropped, "
            f"{clean.id.isin(kept).sum()} of {len(clean)} clean rows kept")
