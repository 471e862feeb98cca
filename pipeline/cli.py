"""The ``rag4dmc`` command line: ``kb build``, ``complete``, ``evaluate``, ``demo``, ``serve``.

Every tunable flag names a configuration key (``--alpha`` is ``retrieval.alpha``); ``--config FILE``
reads a YAML file with the same keys, and flags given on the command line override it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, get_args

from rag4dmc.pipeline.config import ConfigError, JobConfig, KBConfig, read_yaml, validate

log = logging.getLogger("rag4dmc")

# flag -> (config key, type, help). One table per config model; the YAML file uses the same keys.
STORAGE_FLAGS = {
    "--endpoint-url": ("storage.endpoint_url", str, "S3-compatible endpoint (default: AWS settings)"),
    "--aws-key": ("storage.key", str, "access key (default: AWS environment/config)"),
    "--aws-secret": ("storage.secret", str, "secret key (default: AWS environment/config)"),
    "--region": ("storage.region", str, "object-storage region"),
}
COLUMN_FLAGS = {
    "--id-column": ("columns.id", str, "column with the sample id"),
    "--image-column": ("columns.image", str, "column with image bytes or a path/URI"),
    "--text-column": ("columns.text", str, "column with the text"),
}
LABEL_FLAGS = {"--label-column": ("columns.label", str, "column with a class label: the report adds label agreement")}
KB_FLAGS = {
    "--encoder": ("encoder.backend", str, "lite (offline default) or open_clip"),
    "--model-name": ("encoder.model_name", str, "open_clip architecture, e.g. ViT-L-14"),
    "--pretrained": ("encoder.pretrained", str, "open_clip tag, local checkpoint or s3:// checkpoint"),
    "--model-dir": ("encoder.model_dir", str, "folder with downloaded encoder weights"),
    "--device": ("encoder.device", str, "auto, cpu or cuda"),
    "--tau-cent": ("filter.tau_cent", float, "drop external clusters below this centroid cosine"),
    "--tau-inst": ("filter.tau_inst", float, "drop external rows below this cosine to their matched centroid"),
    "--csls-k": ("align.csls_k", int, "neighbours in the CSLS hubness correction"),
    "--align-rounds": ("align.max_rounds", int, "Procrustes refinement rounds"),
    "--index-kind": ("index.kind", str, "auto, flat, ivf, ivfpq or hnsw"),
    "--shards": ("index.shards", int, "index shards (one per retrieval actor)"),
    "--mapping-epochs": ("mapping.max_epochs", int, "maximum epochs of the mapping MLP"),
    "--no-calibration": ("calibration.enabled", None, "keep the configured settings instead of calibrating them "
                         "on held-out internal pairs"),
}
JOB_FLAGS = {
    "--alpha": ("retrieval.alpha", float, "fusion weight of the intra-modal cosine"),
    "--top-k": ("retrieval.top_k", int, "stage-1 candidates"),
    "--n-results": ("retrieval.n_results", int, "neighbours handed to generation"),
    "--retrieval-mode": ("retrieval.mode", str, "fusion, intra or mapped"),
    "--text-generator": ("generator.text_backend", str, "nn (offline default) or blip2"),
    "--image-generator": ("generator.image_backend", str, "nn (offline default) or sdxl"),
    "--n-candidates": ("generator.n_candidates", int, "candidates generated per row"),
    "--blip2-model": ("generator.blip2_model", str, "BLIP2 checkpoint: hub name, local path or s3://"),
    "--sdxl-model": ("generator.sdxl_model", str, "SDXL checkpoint: hub name, local path or s3://"),
    "--generator-model-dir": ("generator.model_dir", str, "folder with downloaded generator weights"),
    "--strength": ("generator.strength", float, "SDXL img2img strength"),
    "--image-format": ("generator.image_format", str, "png, jpeg or webp"),
    "--niqe-params": ("selection.niqe_params", str, "NIQE parameter file (.npz or .mat)"),
    "--image-quality": ("selection.image_quality", str, "niqe, or none to rank images by cosine only"),
    "--lambda-cos": ("selection.lambda_cos", float, "weight of the cosine term in selection"),
    "--lambda-quality": ("selection.lambda_quality", float, "weight of BLEU / NIQE in selection"),
    "--lambda-retrieval": ("selection.lambda_retrieval", float,
                           "weight of the fused retrieval score of a retrieved candidate in selection"),
    "--accelerators": ("accelerators", str, "auto, gpu or cpu"),
}
# `rag4dmc complete` only (the service writes no files)
OUTPUT_FLAGS = {"--output-format": ("output_format", str, "committed files: parquet, or webdataset tars in "
                                    "img2dataset's layout (a resumed run keeps its format)")}
OUTPUT_CHOICES = {"--output-format": {"choices": list(get_args(JobConfig.model_fields["output_format"].annotation))}}
# `rag4dmc evaluate`: its own keys (EVAL_NARGS: flags that take several values), and the job's retrieval and
# selection flags, which every retrieval variant shares.
EVAL_FLAGS = {
    "--missing-rate": ("evaluation.missing_rates", float,
                       "fractions of training rows that lose a modality, in (0, 1); several give a plot"),
    "--variants": ("evaluation.variants", str, "variants to run: drop direct vanilla combined kfa rag4dmc complete"),
    "--image-loss-ratio": ("evaluation.image_loss_ratio", float, "share of the masked rows that lose the image"),
    "--test-fraction": ("evaluation.test_fraction", float, "complete pairs held out for downstream recall"),
    "--sweep": ("evaluation.sweeps", str, "NAME=V1,V2,...: the sweep variant at each value of alpha "
                "(retrieval.alpha), k (retrieval.top_k), n (retrieval.n_results) or lambda "
                "(selection.lambda_quality); repeat for several sweeps"),
    "--sweep-variant": ("evaluation.sweep_variant", str, "the variant the sweeps evaluate"),
    "--examples": ("evaluation.examples", int, "example completions shown in the report"),
    "--repeats": ("evaluation.repeats", int, "independent splits and masks: means with 95% intervals, paired "
                  "differences between variants"),
    "--seed": ("evaluation.seed", int, "seed of the test split and the masking"),
}
EVAL_NARGS = {"--missing-rate": {"nargs": "+", "action": "extend"}, "--variants": {"nargs": "+", "action": "extend"},
              "--sweep": {"action": "append"}}
EVAL_JOB_FLAGS = {flag: JOB_FLAGS[flag] for flag in ("--alpha", "--top-k", "--n-results", "--lambda-cos",
                                                     "--lambda-quality", "--lambda-retrieval", "--niqe-params",
                                                     "--image-quality")}
# `rag4dmc serve`: the service's own keys (ServeConfig); the job's flags set retrieval, generation and selection.
API_KEY_ENV = "RAG4DMC_API_KEY"  # keeps the key off the command line (and out of process listings)
SERVE_HOST, SERVE_PORT = "127.0.0.1", 8000
SERVE_FLAGS = {
    "--kb": ("kb", str, "knowledge base built by `rag4dmc kb build` (required, here or in --config)"),
    "--api-key": ("api_key", str, f"clients must send it in the x-api-key header (default: ${API_KEY_ENV}; "
                  "neither: no key needed)"),
    "--max-upload-bytes": ("max_upload_bytes", int, "largest request body accepted (413 above)"),
    "--max-text-chars": ("max_text_chars", int, "longest text accepted"),
    "--batch-wait": ("batch_wait_timeout_s", float, "seconds a batch waits for more requests"),
    "--request-timeout": ("request_timeout_s", float, "seconds before an unanswered request gets 504"),
}


def _add_flags(parser: argparse.ArgumentParser, table: dict, extra: dict | None = None) -> None:
    """One option per flag of ``table``; ``extra`` adds argparse keywords per flag (nargs, action)."""
    for flag, (key, typ, text) in table.items():
        if typ is None:  # a switch that sets a boolean key to False
            parser.add_argument(flag, action="store_const", const=False, default=None, dest=key, help=f"{text} [{key}]")
            continue
        parser.add_argument(flag, type=typ, default=None, dest=key, help=f"{text} [{key}]",
                            **(extra or {}).get(flag, {}))


def _set(tree: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def build_config(args: argparse.Namespace, model, tables: list[dict]):
    """The config from ``--config`` YAML overlaid with the flags that were given."""
    data: dict = read_yaml(args.config) if getattr(args, "config", None) else {}
    for table in tables:
        for key, *_ in table.values():
            value = getattr(args, key, None)
            if value is not None:
                _set(data, key, value)
    return validate(data, model, source=getattr(args, "config", None) or "flags")


def _storage_only(args) -> dict:
    data: dict = {}
    for key, *_ in STORAGE_FLAGS.values():
        value = getattr(args, key, None)
        if value is not None:
            _set(data, key, value)
    return data.get("storage", {})


def cmd_kb_build(args) -> int:
    from rag4dmc.pipeline.config import ColumnsConfig, StorageConfig
    from rag4dmc.pipeline.job.kb_runner import KBBuildSpec, run_kb_build

    cfg = build_config(args, KBConfig, [KB_FLAGS])
    spec = KBBuildSpec(
        internal=args.internal, external=args.external, out=args.out, cfg=cfg,
        internal_embeddings=args.internal_embeddings, external_embeddings=args.external_embeddings,
        columns=ColumnsConfig(**{k.split(".")[1]: getattr(args, k) for k, *_ in COLUMN_FLAGS.values()
                                 if getattr(args, k) is not None}),
        storage=StorageConfig(**_storage_only(args)), data_format=args.format,
    )
    result = run_kb_build(spec)
    rep = result["report"]
    print(f"knowledge base {result['version']}: {result['rows']} entries at {result['out']}")
    recall = rep.get("recall", {})
    print(f"  index {rep.get('index_kind')}: recall@10 image {recall.get('image')}, text {recall.get('text')} on "
          f"{recall.get('queries')} sampled queries" + ("  (below index.min_recall)" if recall.get("below_min") else ""))
    if "filter" in rep:
        print(f"  purification: kept {rep['filter']['kept_pairs']} external pairs, dropped "
              f"{rep['filter']['dropped_pairs']}")
    cal = rep.get("calibration")
    if isinstance(cal, dict):
        for task, d in cal["directions"].items():
            default = (d["default"] or {}).get("fidelity")
            print(f"  calibrated {task} on {cal['holdout_pairs']} held-out pairs: {d['retrieval'] | d['selection']}, "
                  f"fidelity {d['fidelity']:.3f} ± {d['ci']:.3f} (paper defaults: "
                  f"{'-' if default is None else f'{default:.3f}'}; {d['chosen_because']})")
    else:
        print(f"  calibration: {cal}")
    return 0


def cmd_complete(args) -> int:
    from rag4dmc.pipeline.job.runner import JobSpec, run_job

    cfg = build_config(args, JobConfig, [JOB_FLAGS, OUTPUT_FLAGS, STORAGE_FLAGS, COLUMN_FLAGS])
    spec = JobSpec(data=args.data, kb=args.kb, out=args.out, cfg=cfg, data_format=args.format,
                   retry_failed=args.retry_failed, dry_run=args.dry_run)
    summary = run_job(spec)
    if spec.dry_run:
        return 0
    print(json.dumps(summary, indent=2))
    return 0 if summary["rows_out"] == summary["unique_row_keys"] else 1


def _parse_sweeps(specs: list[str]) -> dict[str, list[str]]:
    """``["alpha=0,0.5", "k=10"]`` as ``{"alpha": ["0", "0.5"], "k": ["10"]}`` (values are validated later)."""
    sweeps: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        if not sep or not name.strip() or not values.strip():
            raise ConfigError(f"evaluation.sweeps (--sweep): expected NAME=V1,V2,... such as alpha=0,0.5,1, "
                              f"got {spec!r}")
        sweeps.setdefault(name.strip(), []).extend(v.strip() for v in values.split(",") if v.strip())
    return sweeps


def cmd_evaluate(args) -> int:
    from rag4dmc.pipeline.config import EvalConfig
    from rag4dmc.pipeline.evaluation.data import EvaluationError
    from rag4dmc.pipeline.evaluation.markdown import markdown_table
    from rag4dmc.pipeline.evaluation.runner import evaluate_datasets

    specs = getattr(args, "evaluation.sweeps")
    if specs is not None:
        setattr(args, "evaluation.sweeps", _parse_sweeps(specs))
    cfg = build_config(args, EvalConfig, [KB_FLAGS, EVAL_JOB_FLAGS, EVAL_FLAGS, STORAGE_FLAGS, COLUMN_FLAGS,
                                          LABEL_FLAGS])
    try:
        payload, files = evaluate_datasets(args.data, args.external, args.out, cfg, data_format=args.format)
    except EvaluationError as exc:
        print(f"rag4dmc: {exc}", file=sys.stderr)
        return 2
    print(markdown_table(payload["variants"]))
    for line in payload["findings"]:
        print(f"- {line}")
    print(f"\nreport: {files['html']}\nmetrics: {files['metrics']}\ntable: {files['table']}")
    return 0


def cmd_serve(args) -> int:
    from rag4dmc.deploy.local import run_local
    from rag4dmc.pipeline.config import ServeConfig

    if args.api_key is None:
        args.api_key = os.environ.get(API_KEY_ENV) or None
    run_local(build_config(args, ServeConfig, [SERVE_FLAGS, JOB_FLAGS, STORAGE_FLAGS]), args.host, args.port)
    return 0


def cmd_setup(args) -> int:
    from rag4dmc.pipeline.setup_data import install_niqe_params

    path = install_niqe_params(dest=Path(args.dest) if args.dest else None,
                               sdist=Path(args.sdist) if args.sdist else None)
    print(f"NIQE parameters installed at {path}")
    return 0


def cmd_demo(args) -> int:
    from rag4dmc.pipeline.demo.run import run_demo

    return run_demo(args.out, n_internal=args.n_internal, n_external=args.n_external,
                    n_incomplete=args.n_incomplete, niqe_params=args.niqe_params, seed=args.seed)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rag4dmc", description="Complete missing modalities in image-text corpora.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    kb = sub.add_parser("kb", help="knowledge-base commands").add_subparsers(dest="kb_command", required=True)
    build = kb.add_parser("build", help="build the purified dual knowledge base",
                          description="Embed internal and external pairs, train the mapping, purify and index.")
    build.add_argument("--internal", help="target dataset (its complete pairs form the internal KB)")
    build.add_argument("--external", help="external corpus (CC3M, LAION, ...), embedded here")
    build.add_argument("--internal-embeddings", help="precomputed embeddings of the internal pairs instead of "
                       "--internal: a clip-retrieval layout (img_emb/, text_emb/, metadata/), local or s3://")
    build.add_argument("--external-embeddings", help="precomputed embeddings of the external corpus (clip-retrieval "
                       "layout, e.g. LAION's published ones) instead of --external")
    build.add_argument("--out", required=True, help="KB folder or s3:// prefix")
    build.add_argument("--config", help="YAML file with knowledge-base keys")
    build.add_argument("--format", default="auto", choices=["auto", "parquet", "jsonl", "webdataset"])
    _add_flags(build, KB_FLAGS)
    _add_flags(build, COLUMN_FLAGS)
    _add_flags(build, STORAGE_FLAGS)
    build.set_defaults(func=cmd_kb_build)

    comp = sub.add_parser("complete", help="complete every incomplete sample of a dataset",
                          description="Stream DATA through embed -> fusion retrieval -> generation -> selection.")
    comp.add_argument("--data", required=True, help="dataset folder/file or s3:// prefix")
    comp.add_argument("--kb", required=True, help="knowledge base built by `rag4dmc kb build`")
    comp.add_argument("--out", required=True, help="output folder or s3:// prefix")
    comp.add_argument("--config", help="YAML file with job keys")
    comp.add_argument("--format", default="auto", choices=["auto", "parquet", "jsonl", "webdataset"])
    comp.add_argument("--retry-failed", action="store_true", help="recompute only rows marked failed")
    comp.add_argument("--dry-run", action="store_true",
                      help="print the plan on this cluster (pools and sizes, rows per direction, expected GPU-hours "
                      "and wall time) and start nothing")
    _add_flags(comp, JOB_FLAGS)
    _add_flags(comp, OUTPUT_FLAGS, OUTPUT_CHOICES)
    _add_flags(comp, COLUMN_FLAGS)
    _add_flags(comp, STORAGE_FLAGS)
    comp.set_defaults(func=cmd_complete)

    ev = sub.add_parser("evaluate", help="the table of variants on your own complete data, with an HTML report",
                        description="Hold out a test split, mask the rest at each missing rate, complete it with "
                        "each variant; write REPORT/metrics.json, metrics.md and report.html.")
    ev.add_argument("--data", required=True, help="complete image-text pairs: folder/file or s3:// prefix")
    ev.add_argument("--external", required=True, help="external corpus (CC3M, LAION, ...)")
    ev.add_argument("--out", required=True, help="report folder or s3:// prefix")
    ev.add_argument("--config", help="YAML file with knowledge-base, retrieval, selection and evaluation keys")
    ev.add_argument("--format", default="auto", choices=["auto", "parquet", "jsonl", "webdataset"])
    _add_flags(ev, EVAL_FLAGS, EVAL_NARGS)
    _add_flags(ev, EVAL_JOB_FLAGS)
    _add_flags(ev, KB_FLAGS)
    _add_flags(ev, COLUMN_FLAGS)
    _add_flags(ev, LABEL_FLAGS)
    _add_flags(ev, STORAGE_FLAGS)
    ev.set_defaults(func=cmd_evaluate)

    srv = sub.add_parser("serve", help="serve completions over HTTP (Ray Serve), one sample per request",
                         description="Run the Ray Serve application of deploy/app.py here: POST /v1/complete, "
                         "GET /healthz. On a cluster: serve deploy deploy/serve_config.yaml.")
    srv.add_argument("--host", default=SERVE_HOST, help="address to listen on (default: loopback only)")
    srv.add_argument("--port", type=int, default=SERVE_PORT, help="HTTP port")
    srv.add_argument("--config", help="YAML file with serve keys (pipeline/config.py ServeConfig)")
    _add_flags(srv, SERVE_FLAGS)
    _add_flags(srv, JOB_FLAGS)
    _add_flags(srv, STORAGE_FLAGS)
    srv.set_defaults(func=cmd_serve)

    setup = sub.add_parser("setup", help="install the data files rag4dmc needs offline (NIQE's parameters)",
                           description="Fetch basicsr 1.4.2's sdist from PyPI with pip and install NIQE's "
                           "parameters where complete, serve and evaluate find them without flags.")
    setup.add_argument("--dest", help="install here instead (then point $RAG4DMC_NIQE_PARAMS at it)")
    setup.add_argument("--sdist", help="an already downloaded basicsr-1.4.2.tar.gz (no download)")
    setup.set_defaults(func=cmd_setup)

    demo = sub.add_parser("demo", help="offline end-to-end demo on generated data",
                          description="Generate a corpus, build the KB, complete, evaluate; prints the report.")
    demo.add_argument("--out", default="demo_out")
    demo.add_argument("--n-internal", type=int, default=300)
    demo.add_argument("--n-external", type=int, default=400)
    demo.add_argument("--n-incomplete", type=int, default=150)
    demo.add_argument("--niqe-params", help="NIQE parameter file (default: the one `rag4dmc setup` installs)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"rag4dmc: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"rag4dmc: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
