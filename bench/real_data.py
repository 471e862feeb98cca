"""rag4dmc on real data nobody here generated: the Unicode emoji drawn by Noto Color Emoji (``bench/emoji.py``).

The default commands, with no flags beyond paths, as a new user runs them:

1. ``kb build --internal INTERNAL --external EXTERNAL --out KB``: the calibration's choice per direction, its
   held-out fidelity beside the best grid point, the paper's defaults (alpha 0.5, n 4, ...) and top-1;
2. ``complete --data INCOMPLETE --kb KB --out OUT``: every row out once, with the fidelity of the
   completions to the hidden truth (cosine in the encoder's space) and their label agreement (the chosen
   example's emoji group is the query's);
3. ``evaluate --data INTERNAL --external EXTERNAL --label-column label --repeats R``: RAG4DMC (calibrated)
   and the others, with paired differences against Drop-Incomplete and Vanilla-RAG at missing rates
   0.3 / 0.5 / 0.7, and which of the paper's orderings hold.

The internal, incomplete and in-domain external parts are disjoint random thirds of every emoji group but
the off-domain one (Flags), which goes to the external part whole; a fifth of the external pairs get
shuffled captions (``split_corpus``).

    python bench/real_data.py                       # the whole corpus, 5 repeats
    python bench/real_data.py --limit 600 --repeats 2 --rates 0.5   # quick
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import REPO, Target, report  # noqa: E402
from bench.emoji import emoji_list, emoji_pairs, split_corpus  # noqa: E402

OFF_DOMAIN = ["Flags"]
SKIPPED_GROUPS = ["Component"]  # skin-tone swatches and hair parts: not things with names worth completing
WORK = REPO / "runs" / "real_data"


def write_corpus(root: Path, limit: int | None, seed: int) -> dict[str, str]:
    """The emoji split as parquet files (with the group as ``label``); their paths by part."""
    groups = sorted({e.group for e in emoji_list()} - set(SKIPPED_GROUPS))
    table = emoji_pairs(groups=groups, limit=limit, seed=seed)
    parts = split_corpus(table, [g for g in groups if g not in OFF_DOMAIN], OFF_DOMAIN, internal_fraction=1 / 3,
                         incomplete_fraction=1 / 3, seed=seed)
    paths = {}
    for name, part in parts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        paths[name] = str(root / name / "part-00000.parquet")
        pq.write_table(part, paths[name])
    return paths


def cli(*argv: str) -> None:
    from rag4dmc.pipeline.cli import main

    rc = main(list(argv))
    if rc != 0:
        raise SystemExit(f"rag4dmc {' '.join(argv)} exited with {rc}")


def completion_quality(paths: dict[str, str], out: str) -> dict:
    """Fidelity of the job's completions to the hidden truth, and their label agreement, per direction."""
    from rag4dmc.actors.factory import create_encoder
    from rag4dmc.actors.images import load_image
    from rag4dmc.pipeline.config import EncoderConfig
    from rag4dmc.pipeline.core.confidence import auroc, by_coverage
    from rag4dmc.pipeline.evaluation.confidence_checks import COVERAGES
    from rag4dmc.pipeline.io.storage import Storage
    from rag4dmc.pipeline.job.runner import read_output

    truth = pq.read_table(paths["incomplete"]).to_pylist()
    by_id = {r["id"]: r for r in truth}
    rows = read_output(Storage(), out).to_pylist()
    kb_labels = {}
    for part in ("internal", "external"):
        for r in pq.read_table(paths[part], columns=["id", "label"]).to_pylist():
            kb_labels[r["id"]] = r["label"]
    enc = create_encoder(EncoderConfig(device="cpu"))
    out_stats = {"rows_in": len(truth), "rows_out": len(rows), "unique_ids": len({r["id"] for r in rows}),
                 "failed": sum(r["status"] == "failed" for r in rows)}
    for generated in ("text", "image"):
        done = [r for r in rows if r["status"] == "completed" and r["generated"] == generated]
        if not done:
            continue
        if generated == "text":
            got = enc.encode_texts([r["text"] for r in done])
            want = enc.encode_texts([by_id[r["id"]]["true_text"] for r in done])
        else:
            got = enc.encode_images([load_image(r["image"]) for r in done])
            want = enc.encode_images([load_image(by_id[r["id"]]["true_image"]) for r in done])
        cos = np.einsum("nd,nd->n", got, want)
        chosen = [r["candidate_ids"][r["chosen"]] if r["candidate_ids"] else None for r in done]
        top1 = [r["retrieved_ids"][0] if r["retrieved_ids"] else None for r in done]
        label = [by_id[r["id"]]["label"] for r in done]
        task = "i2t" if generated == "text" else "t2i"
        agree = np.array([kb_labels.get(c) == lab for c, lab in zip(chosen, label)])
        conf = np.array([r["confidence"] for r in done], np.float64)
        out_stats[task] = {
            "rows": len(done), "fidelity_cos": float(cos.mean()),
            "label_agreement": float(agree.mean()),
            "confidence_auroc_for_label_agreement": auroc(conf, agree),
            "label_agreement_by_coverage": by_coverage(conf, agree, COVERAGES),
            "top1_label_agreement": float(np.mean([kb_labels.get(c) == lab for c, lab in zip(top1, label)])),
            "settings": json.loads(done[0]["settings"]),
        }
    return out_stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=None, help="a random sample of this many emoji (default: all)")
    ap.add_argument("--repeats", type=int, default=5, help="evaluation repeats")
    ap.add_argument("--rates", default="0.3,0.5,0.7", help="evaluation missing rates")
    ap.add_argument("--eval-pairs", type=int, default=900, help="complete pairs the evaluation holds out and masks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=str(WORK), help="folder for the corpus, KB, output and report")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = Path(args.work)
    t0 = time.perf_counter()
    paths = write_corpus(root / "corpus", args.limit, args.seed)
    sizes = {k: pq.read_metadata(v).num_rows for k, v in paths.items()}
    print("corpus:", sizes)

    t = time.perf_counter()
    cli("kb", "build", "--internal", paths["internal"], "--external", paths["external"], "--out", str(root / "kb"))
    kb_seconds = time.perf_counter() - t
    kb_report = json.loads((root / "kb" / "report.json").read_text())
    cal = kb_report["calibration"]

    t = time.perf_counter()
    cli("complete", "--data", paths["incomplete"], "--kb", str(root / "kb"), "--out", str(root / "completed"))
    job_seconds = time.perf_counter() - t
    quality = completion_quality(paths, str(root / "completed"))

    # The evaluation takes complete pairs with labels: the internal part, sampled to --eval-pairs.
    internal = pq.read_table(paths["internal"])
    keep = np.sort(np.random.default_rng(args.seed).permutation(internal.num_rows)[: args.eval_pairs])
    (root / "eval_data").mkdir(parents=True, exist_ok=True)
    pq.write_table(internal.take(pa.array(keep)), root / "eval_data" / "part-00000.parquet")
    t = time.perf_counter()
    cli("evaluate", "--data", str(root / "eval_data"), "--external", paths["external"], "--out", str(root / "report"),
        "--label-column", "label", "--repeats", str(args.repeats), "--missing-rate", *args.rates.split(","))
    eval_seconds = time.perf_counter() - t
    metrics = json.loads((root / "report" / "metrics.json").read_text())

    cal_rows = []
    for task, d in cal["directions"].items():
        for what, point in (("calibrated", d), ("paper default", d["default"]), ("top-1 (default alpha)", d["top1"])):
            cal_rows.append({"direction": task, "setting": what, "alpha": point.get("alpha", d["retrieval"]["alpha"]),
                             "top_k": point.get("top_k", d["retrieval"]["top_k"]),
                             "n": point.get("n_results", d["retrieval"]["n_results"]),
                             "lambda_q": point.get("lambda_quality", d["selection"]["lambda_quality"]),
                             "lambda_r": point.get("lambda_retrieval", d["selection"]["lambda_retrieval"]),
                             "held-out fidelity": point["fidelity"], "ci": point["ci"]})
        best = max(cal["grid"][task], key=lambda p: p["fidelity"])
        cal_rows.append({"direction": task, "setting": "best grid point", "alpha": best["alpha"], "top_k": best["top_k"],
                         "n": best["n_results"], "lambda_q": best["lambda_quality"], "lambda_r": best["lambda_retrieval"],
                         "held-out fidelity": best["fidelity"], "ci": best["ci"]})
        cal_rows.append({"direction": task, "setting": "calibrated, cross-fitted", "held-out fidelity":
                         d["cross_fitted_fidelity"], "ci": ""})
    job_rows = [{"direction": task, "rows": q["rows"], "fidelity (cos to truth)": q["fidelity_cos"],
                 "label agreement": q["label_agreement"], "top-1 label agreement": q["top1_label_agreement"],
                 "calibrated keys": ", ".join(q["settings"]["calibrated"]) or "-"}
                for task, q in quality.items() if task in ("i2t", "t2i")]
    paired_rows = []
    for e in metrics["variants"]:
        if e["name"] not in ("rag4dmc", "rag4dmc_confident", "rag4dmc_default", "kfa", "vanilla"):
            continue
        for ref, diffs in e["paired"].items():
            for m in ("i2t_r1", "t2i_r1", "bleu4", "image_cosine", "i2t_label", "t2i_label"):
                if m in diffs:
                    paired_rows.append({"missing rate": e["missing_rate"], "variant": e["label"], "minus": ref,
                                        "metric": m, "diff": diffs[m]["diff"], "ci": diffs[m]["ci"],
                                        "verdict": diffs[m]["verdict"]})
    purification = cal.get("purification") or {}
    pur_rows = [{"step": t["step"], **{k: t[k] for k in ("proximal", "pick", "tau_cent", "tau_inst", "kept") if k in t},
                 "i2t": t["i2t"], "t2i": t["t2i"], "mean": t["mean"]} for t in purification.get("tried", [])]
    conf_rows, coverage_rows, agreement_rows = [], [], []
    for task, d in cal["directions"].items():
        c = d.get("confidence")
        if c is None:
            continue
        conf_rows.append({"direction": task, "held-out pairs": c["pairs"], "faithful": c["faithful_rate"],
                          "ECE (cross-fitted)": c["ece"], "AUROC faithful (cross-fitted)": c["auroc"],
                          "AUROC label agreement (job)": quality[task]["confidence_auroc_for_label_agreement"]})
        for row in c["coverage_precision"]:
            coverage_rows.append({"direction": task, "min_confidence": row["threshold"], "kept": row["coverage"],
                                  "faithful among kept": row["precision"]})
        for row in quality[task]["label_agreement_by_coverage"]:
            agreement_rows.append({"direction": task, "most confident kept": row["coverage"],
                                   "label agreement": row["agreement"]})
    targets = []
    for task, d in cal["directions"].items():
        c = d.get("confidence") or {}
        targets.append(Target(f"{task}: ECE of confidence on cross-fitted held-out pairs", c.get("ece", float("inf")),
                              0.05, at_least=False))
        targets.append(Target(f"{task}: AUROC of confidence for label agreement (job rows)",
                              quality[task]["confidence_auroc_for_label_agreement"], 0.8))
        best = max(p["fidelity"] for p in cal["grid"][task])
        best_ci = max(cal["grid"][task], key=lambda p: p["fidelity"])["ci"]
        targets.append(Target(f"{task}: calibrated fidelity >= best grid point - its CI", d["fidelity"], best - best_ci))
        if d["default"] is not None:
            targets.append(Target(f"{task}: calibrated fidelity >= the paper's default", d["fidelity"],
                                  d["default"]["fidelity"]))
    targets.append(Target("every input row out exactly once", float(quality["unique_ids"] == quality["rows_in"]
                                                                    == quality["rows_out"]), 1.0))
    report("real_data", {
        "Calibration at KB build (held-out internal pairs)": (cal_rows, ["direction", "setting", "alpha", "top_k", "n",
                                                                          "lambda_q", "lambda_r", "held-out fidelity",
                                                                          "ci"]),
        "Purification candidates (mean held-out fidelity)": (pur_rows, ["step", "proximal", "pick", "tau_cent",
                                                                         "tau_inst", "kept", "i2t", "t2i", "mean"]),
        "Completion job with the defaults (truth hidden from it)": (job_rows, list(job_rows[0]) if job_rows else []),
        "Confidence: the KB's model on held-out pairs, and on the job's rows against the labels": (
            conf_rows, ["direction", "held-out pairs", "faithful", "ECE (cross-fitted)", "AUROC faithful (cross-fitted)",
                        "AUROC label agreement (job)"]),
        "Confidence: coverage x precision on held-out pairs (what kb build prints)": (
            coverage_rows, ["direction", "min_confidence", "kept", "faithful among kept"]),
        "Confidence: label agreement of the job's most confident completions": (
            agreement_rows, ["direction", "most confident kept", "label agreement"]),
        "Evaluation: paired differences (mean over repeats, 95% CI)": (paired_rows, ["missing rate", "variant",
                                                                                      "minus", "metric", "diff", "ci",
                                                                                      "verdict"]),
    }, {"corpus": sizes, "seconds": {"kb_build": kb_seconds, "complete": job_seconds, "evaluate": eval_seconds,
                                     "total": time.perf_counter() - t0},
        "job": quality, "calibration_seconds": cal["seconds"], "holdout_pairs": cal["holdout_pairs"],
        "findings": metrics["findings"], "repeats": metrics["repeats"]}, targets)
    print("\n".join(f"- {f}" for f in metrics["findings"]))


if __name__ == "__main__":
    main()
