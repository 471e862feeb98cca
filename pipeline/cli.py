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
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from rag4dmc.pipeline.config import (
    ConfigError,
    EvalConfig,
    JobConfig,
    KBConfig,
    ServeConfig,
    read_yaml,
    validate,
)

log = logging.getLogger("rag4dmc")

# flag -> config key. One table per command's group of keys; the YAML file uses the same keys. A flag's type,
# choices, default and help come from the key's field in pipeline/config.py (its description): one text, no copy.
STORAGE_FLAGS = {"--endpoint-url": "storage.endpoint_url", "--aws-key": "storage.key", "--aws-secret": "storage.secret",
                 "--region": "storage.region"}
COLUMN_FLAGS = {"--id-column": "columns.id", "--image-column": "columns.image", "--text-column": "columns.text"}
LABEL_FLAGS = {"--label-column": "columns.label"}
KB_FLAGS = {
    "--encoder": "encoder.backend", "--model-name": "encoder.model_name", "--pretrained": "encoder.pretrained",
    "--model-dir": "encoder.model_dir", "--device": "encoder.device", "--tau-cent": "filter.tau_cent",
    "--tau-inst": "filter.tau_inst", "--csls-k": "align.csls_k", "--align-rounds": "align.max_rounds",
    "--index-kind": "index.kind", "--shards": "index.shards", "--mapping-epochs": "mapping.max_epochs",
    "--no-calibration": "calibration.enabled",  # a switch: sets the boolean key to False
}
JOB_FLAGS = {
    "--alpha": "retrieval.alpha", "--top-k": "retrieval.top_k", "--n-results": "retrieval.n_results",
    "--retrieval-mode": "retrieval.mode", "--text-generator": "generator.text_backend",
    "--image-generator": "generator.image_backend", "--n-candidates": "generator.n_candidates",
    "--blip2-model": "generator.blip2_model", "--sdxl-model": "generator.sdxl_model",
    "--generator-model-dir": "generator.model_dir", "--strength": "generator.strength",
    "--image-format": "generator.image_format", "--niqe-params": "selection.niqe_params",
    "--image-quality": "selection.image_quality", "--lambda-cos": "selection.lambda_cos",
    "--lambda-quality": "selection.lambda_quality", "--lambda-retrieval": "selection.lambda_retrieval",
    "--accelerators": "accelerators",
}
# `rag4dmc complete` only (the service writes no files, and takes min_confidence per request)
OUTPUT_FLAGS = {"--output-format": "output_format", "--min-confidence": "min_confidence"}
# `rag4dmc evaluate`: its own keys, and the job's retrieval and selection flags, which every retrieval variant shares
EVAL_FLAGS = {
    "--missing-rate": "evaluation.missing_rates", "--variants": "evaluation.variants",
    "--image-loss-ratio": "evaluation.image_loss_ratio", "--test-fraction": "evaluation.test_fraction",
    "--sweep": "evaluation.sweeps", "--sweep-variant": "evaluation.sweep_variant", "--examples": "evaluation.examples",
    "--repeats": "evaluation.repeats", "--seed": "evaluation.seed",
}
EVAL_JOB_FLAGS = {flag: JOB_FLAGS[flag] for flag in ("--alpha", "--top-k", "--n-results", "--lambda-cos",
                                                     "--lambda-quality", "--lambda-retrieval", "--niqe-params",
                                                     "--image-quality")}
# `rag4dmc serve`: the service's own keys (ServeConfig); the job's flags set retrieval, generation and selection.
API_KEY_ENV = "RAG4DMC_API_KEY"  # keeps the key off the command line (and out of process listings)
SERVE_HOST, SERVE_PORT = "127.0.0.1", 8000
SERVE_FLAGS = {"--kb": "kb", "--api-key": "api_key", "--max-upload-bytes": "max_upload_bytes",
               "--max-text-chars": "max_text_chars", "--batch-wait": "batch_wait_timeout_s",
               "--request-timeout": "request_timeout_s"}
# What the command line says beyond the field: a form the field's type does not give, or where a default comes from
FLAG_NOTES = {"--sweep": "NAME=V1,V2,... with NAME one of alpha (retrieval.alpha), k (retrieval.top_k), n "
                         "(retrieval.n_results), lambda (selection.lambda_quality); repeat for several sweeps",
              "--api-key": f"default: ${API_KEY_ENV}", "--kb": "required, here or in --config"}


def field_of(model: type[BaseModel], key: str) -> FieldInfo:
    """The pydantic field of a dotted configuration key (``retrieval.alpha``) of ``model``."""
    *parents, leaf = key.split(".")
    for name in parents:
        model = _models(model.model_fields[name].annotation)[0]
    return model.model_fields[leaf]


def _models(annotation) -> list:
    """The types an annotation allows (``X | None`` gives X), None left out."""
    args = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    return [a for a in args if a is not type(None)]


def _argparse_kind(annotation) -> tuple[type, list | None, bool]:
    """(value type, choices, takes several values) of a field's annotation, as argparse wants them."""
    (kind,) = _models(annotation)[:1]
    many = get_origin(kind) is list
    if many:
        (kind,) = get_args(kind)
    if get_origin(kind) is Literal:
        return str, list(get_args(kind)), many
    return (kind if kind in (int, float) else str), None, many


def flag_help(field: FieldInfo, key: str, note: str | None = None) -> str:
    """A flag's help: the field's description, the command line's note, its choices, default and key."""
    default = field.get_default(call_default_factory=True)
    shown = "" if default is None or isinstance(default, (dict, SecretStr)) else f"; default {default}"
    choices = _argparse_kind(field.annotation)[1] if field.annotation is not bool else None
    shown = f"; one of {', '.join(choices)}{shown}" if choices else shown
    text = f"{field.description or ''}{f' ({note})' if note else ''}{shown} [{key}]"
    return text.replace("%", "%%")  # argparse formats help with %


def _add_flags(parser: argparse.ArgumentParser, model: type[BaseModel], table: dict[str, str]) -> None:
    """One option per flag of ``table``, typed, checked and described by the field of its key in ``model``."""
    for flag, key in table.items():
        field = field_of(model, key)
        text = flag_help(field, key, FLAG_NOTES.get(flag))
        if field.annotation is bool:  # a switch that turns a key on by default off
            parser.add_argument(flag, action="store_const", const=False, default=None, dest=key,
                                help=f"turn off: {text}")
            continue
        kind, choices, many = _argparse_kind(field.annotation)
        if get_origin(_models(field.annotation)[0]) is dict:  # given as NAME=V1,V2,...; repeatable
            parser.add_argument(flag, action="append", default=None, dest=key, help=text)
            continue
        extra = {"nargs": "+", "action": "extend"} if many else {}
        parser.add_argument(flag, type=kind, choices=choices, default=None, dest=key, help=text,
                            metavar=key.rsplit(".", 1)[-1].upper(), **extra)


def _set(tree: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def build_config(args: argparse.Namespace, model, tables: list[dict]):
    """The config from ``--config`` YAML overlaid with the flags that were given."""
    data: dict = read_yaml(args.config) if getattr(args, "config", None) else {}
    for table in tables:
        for key in table.values():
            value = getattr(args, key, None)
            if value is not None:
                _set(data, key, value)
    return validate(data, model, source=getattr(args, "config", None) or "flags")


def _storage_only(args) -> dict:
    data: dict = {}
    for key in STORAGE_FLAGS.values():
        value = getattr(args, key, None)
        if value is not None:
            _set(data, key, value)
    return data.get("storage", {})


def cmd_kb_build(args) -> int:
    from rag4dmc.pipeline.config import ColumnsConfig, StorageConfig
    from rag4dmc.pipeline.job.kb_runner import KBBuildSpec, run_kb_build
    from rag4dmc.pipeline.kb.build import confidence_lines

    cfg = build_config(args, KBConfig, [KB_FLAGS])
    spec = KBBuildSpec(
        internal=args.internal, external=args.external, out=args.out, cfg=cfg,
        internal_embeddings=args.internal_embeddings, external_embeddings=args.external_embeddings,
        columns=ColumnsConfig(**{k.split(".")[1]: getattr(args, k) for k in COLUMN_FLAGS.values()
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
        for line in confidence_lines(cal):  # what min_confidence would keep, before the spend
            print(f"  {line}")
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


def cmd_verify(args) -> int:
    from rag4dmc.pipeline.io.storage import Storage
    from rag4dmc.pipeline.job.verify import verify

    cfg = build_config(args, JobConfig, [STORAGE_FLAGS, COLUMN_FLAGS])
    report = verify(args.data, args.out, Storage(cfg.storage), args.format, cfg.columns)
    print(json.dumps(report.to_dict(), indent=2))
    for problem in report.problems:
        print(f"rag4dmc verify: {problem}", file=sys.stderr)
    return 0 if report.ok else 1


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
    _add_flags(build, KBConfig, KB_FLAGS)
    _add_flags(build, JobConfig, COLUMN_FLAGS)
    _add_flags(build, JobConfig, STORAGE_FLAGS)
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
    for table in (JOB_FLAGS, OUTPUT_FLAGS, COLUMN_FLAGS, STORAGE_FLAGS):
        _add_flags(comp, JobConfig, table)
    comp.set_defaults(func=cmd_complete)

    ver = sub.add_parser("verify", help="check that every input row is in the output exactly once (run it after "
                         "any crash)", description="Reads the input's row counts and the output's keys, statuses and "
                         "run identity (no image); exits 1 on a lost or duplicated row, a row from another run or an "
                         "unfinished --retry-failed.")
    ver.add_argument("--data", required=True, help="the input the output was made from (folder/file or s3://)")
    ver.add_argument("--out", required=True, help="the output folder of `rag4dmc complete` (or s3:// prefix)")
    ver.add_argument("--config", help="YAML file with job keys (storage, columns)")
    ver.add_argument("--format", default="auto", choices=["auto", "parquet", "jsonl", "webdataset"])
    for table in (COLUMN_FLAGS, STORAGE_FLAGS):
        _add_flags(ver, JobConfig, table)
    ver.set_defaults(func=cmd_verify)

    ev = sub.add_parser("evaluate", help="the table of variants on your own complete data, with an HTML report",
                        description="Hold out a test split, mask the rest at each missing rate, complete it with "
                        "each variant; write REPORT/metrics.json, metrics.md and report.html.")
    ev.add_argument("--data", required=True, help="complete image-text pairs: folder/file or s3:// prefix")
    ev.add_argument("--external", required=True, help="external corpus (CC3M, LAION, ...)")
    ev.add_argument("--out", required=True, help="report folder or s3:// prefix")
    ev.add_argument("--config", help="YAML file with knowledge-base, retrieval, selection and evaluation keys")
    ev.add_argument("--format", default="auto", choices=["auto", "parquet", "jsonl", "webdataset"])
    for table in (EVAL_FLAGS, EVAL_JOB_FLAGS, KB_FLAGS, COLUMN_FLAGS, LABEL_FLAGS, STORAGE_FLAGS):
        _add_flags(ev, EvalConfig, table)
    ev.set_defaults(func=cmd_evaluate)

    srv = sub.add_parser("serve", help="serve completions over HTTP (Ray Serve), one sample per request",
                         description="Run the Ray Serve application of deploy/app.py here: POST /v1/complete, "
                         "GET /healthz. On a cluster: serve deploy deploy/serve_config.yaml.")
    srv.add_argument("--host", default=SERVE_HOST, help="address to listen on (default: loopback only)")
    srv.add_argument("--port", type=int, default=SERVE_PORT, help="HTTP port")
    srv.add_argument("--config", help="YAML file with serve keys (pipeline/config.py ServeConfig)")
    for table in (SERVE_FLAGS, JOB_FLAGS, STORAGE_FLAGS):
        _add_flags(srv, ServeConfig, table)
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
