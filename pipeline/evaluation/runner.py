"""``rag4dmc evaluate``: the paper's table of variants on the user's own complete data.

A held-out test split is set aside, the training split is masked at each missing rate (a share
``image_loss_ratio`` of the masked rows lose the image, the others the text; the rows masked at a lower
rate are also masked at a higher one), and each variant completes the training split. Variants are
configurations of the same knowledge-base, retrieval and selection code the job runs:

    drop        Drop-Incomplete: train on the complete pairs only (lower bound)
    direct      Direct: pseudo-embedding from the mapping, nearest entry of the other modality (no retrieval stage)
    vanilla     Vanilla-RAG: internal KB only, intra-modal retrieval
    combined    Combined-RAG: internal + raw external, intra-modal retrieval
    kfa         KFA-RAG: internal + purified external (filter + align), intra-modal retrieval
    rag4dmc     RAG4DMC: purified KB + two-stage fusion retrieval, settings calibrated at KB build
    rag4dmc_default  RAG4DMC with the paper's default settings (no calibration): what calibration adds
    rag4dmc_confident  RAG4DMC keeping only completions whose confidence reaches a threshold chosen on the KB's
                calibration pairs (``evaluation.confident_precision``); the other masked rows stay incomplete
    complete    Complete: the true training data (upper bound)

Completions are scored against the truth (BLEU-4, CIDEr, embedding cosine; NIQE for images) and by
downstream utility: contrastive heads trained on each variant's data, I2T/T2I recall on the test split;
with a label column, by label agreement (the share of completions whose source entry has the query's
label). Completion uses the nearest-neighbour generator (offline): the candidates are the n retrieved
neighbours' other modality, scored by the job's selection functions (``rag4dmc.pipeline.core.selection``). Sweeps
evaluate one variant at each value of one setting (fusion alpha, top-k, n, selection lambda), the
others as configured, at the first missing rate of the first repeat.

Everything runs ``evaluation.repeats`` times on independent splits and masks: each metric gets its mean and
95% interval, each variant its paired difference against Drop-Incomplete and Vanilla-RAG (same split, same
mask), and the paper's orderings are said to hold, be reversed, or lie within noise
(``rag4dmc.pipeline.core.significance``).

Everything is embedded once; each missing rate builds its own knowledge bases from the rows it leaves
complete. The result is one payload (:func:`evaluate`) that :func:`write_report` turns into
``metrics.json``, ``metrics.md`` and ``report.html``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from rag4dmc.pipeline.config import (
    SWEEP_KEYS,
    EvalConfig,
    RetrievalConfig,
    SelectionConfig,
    StorageConfig,
)
from rag4dmc.pipeline.core.confidence import threshold_for
from rag4dmc.pipeline.core.metrics import bleu4, cider, mean_cosine
from rag4dmc.pipeline.evaluation.confidence_checks import calibration_checks, label_agreement_by_coverage
from rag4dmc.pipeline.evaluation.data import (
    LEFT_OUT_SHOWN,
    EvalData,
    embed_pairs,
    mask,
    read_pairs,
    split,
)
from rag4dmc.pipeline.evaluation.downstream import HeadConfig, evaluate_heads, train_heads
from rag4dmc.pipeline.evaluation.markdown import markdown_report
from rag4dmc.pipeline.evaluation.report_examples import examples
from rag4dmc.pipeline.evaluation.statistics import VariantResult, aggregate, finite, orderings, orderings_text
from rag4dmc.pipeline.evaluation.variants import (
    KB_DESCRIPTIONS,
    VARIANTS,
)
from rag4dmc.pipeline.io.datasets import LABEL_COLUMN
from rag4dmc.pipeline.kb.in_memory import build_knowledge_base
from rag4dmc.pipeline.kb.knowledge_base import KnowledgeBase
from rag4dmc.pipeline.kb.settings import confidence_model, confidence_of, effective_settings
from rag4dmc.pipeline.schema import STATUS_ABSTAINED, TASK_FAILED, TASK_I2T, TASK_T2I

log = logging.getLogger(__name__)


log = logging.getLogger(__name__)


@dataclass
class VariantKB:
    """A knowledge base, the encoder's own (unaligned) embeddings of its entries and their labels, row for row."""

    kb: KnowledgeBase
    raw: dict[str, np.ndarray] | None  # None: entries could not be matched to the embedded data
    labels: np.ndarray | None = None  # each entry's label (None: no label column)
    niqe: dict[str, float] = field(default_factory=dict)  # NIQE of candidate images scored so far, by hash


def _labels(table: pa.Table) -> dict[str, str | None] | None:
    if LABEL_COLUMN not in table.column_names:
        return None
    return dict(zip(table.column("id").to_pylist(), table.column(LABEL_COLUMN).to_pylist()))


def build_variant_kbs(data: EvalData, cfg: EvalConfig, needed: set[str] | None = None) -> dict[str, VariantKB]:
    """The knowledge bases the variants use: internal only, + raw external, + purified external (calibrated,
    as ``rag4dmc kb build`` makes it), + purified external with the default settings (no calibration)."""
    needed = set(KB_DESCRIPTIONS) if needed is None else needed
    kb_cfg = cfg.kb_config()
    plain = kb_cfg.model_copy(update={"calibration": kb_cfg.calibration.model_copy(update={"enabled": False})})
    observed = ~(data.lose_image | data.lose_text)
    internal = data.train.filter(pa.array(observed))
    emb = {"image": data.train_img[observed], "text": data.train_txt[observed]}
    ext = {"image": data.ext_img, "text": data.ext_txt}
    external = data.external if data.external.num_rows else None
    configs = {"internal": (None, None, plain), "raw": (external, ext, plain.model_copy(update={"purify": False})),
               "purified": (external, ext, kb_cfg), "purified_default": (external, ext, plain)}
    train_labels = _labels(data.train)
    labels = None if train_labels is None else {**(_labels(data.external) or {}), **train_labels}
    out = {}
    for name in KB_DESCRIPTIONS:
        if name in needed:
            kb = build_knowledge_base(internal, emb, *configs[name])
            entry_labels = None if labels is None else np.array(
                [labels.get(i) for i in kb.entries.column("id").to_pylist()], dtype=object)
            out[name] = VariantKB(kb, _raw_vectors(kb, emb, data), entry_labels)
    return out


def confident_threshold(calibration: dict | None, task: str, precision: float) -> float | None:
    """The min_confidence of RAG4DMC (confident) for ``task``: the lowest threshold at which the KB's held-out
    calibration pairs (cross-fitted) are faithful at ``precision`` or more, else the most precise one. Chosen on
    the calibration split alone, never on the evaluation's test split. None: the KB has no confidence model
    (calibration off, or too few held-out pairs)."""
    conf = confidence_of(calibration, task)
    if conf is None:
        return None
    table = conf["coverage_precision"]
    found = threshold_for(table, precision)
    if found is not None:
        return found
    return max((r for r in table if r["precision"] is not None),
               key=lambda r: (r["precision"], -r["threshold"]))["threshold"]


def _raw_vectors(kb: KnowledgeBase, internal: dict[str, np.ndarray], data: EvalData
                 ) -> dict[str, np.ndarray] | None:
    """The embeddings of ``kb``'s entries as the encoder made them (the KB holds external ones aligned).

    Internal entries come first, in order; external ones are found by id. Completions are scored with
    these instead of encoding the chosen entries again.
    """
    source = kb.entries.column("source").to_numpy(zero_copy_only=False)
    ext_ids = data.external.column("id").to_pylist()
    where = {i: j for j, i in enumerate(ext_ids)}
    if len(where) != len(ext_ids) or (source == "internal").sum() != len(internal["image"]):
        return None
    ids = kb.entries.column("id").to_pylist()
    rows = [where[ids[i]] for i in np.flatnonzero(source == "external")]
    return {m: np.concatenate([internal[m], (data.ext_img if m == "image" else data.ext_txt)[rows]])
            for m in ("image", "text")}


def variant_configs(name: str, vkb: VariantKB, cfg: EvalConfig, task: str
                    ) -> tuple[RetrievalConfig, SelectionConfig, dict]:
    """The retrieval and selection settings variant ``name`` completes ``task`` rows with, and their provenance:
    the calibrated ones (unless set explicitly) for RAG4DMC, as the job takes them; the configured ones, in
    the variant's retrieval mode, for the others."""
    spec = VARIANTS[name]
    calibration = vkb.kb.manifest.get("calibration") if spec.get("calibrated") else None
    retrieval = cfg.retrieval if spec["mode"] == "fusion" else cfg.retrieval.model_copy(update={"mode": spec["mode"]})
    return effective_settings(retrieval, cfg.selection, calibration, task)


class _CachedNiqe:
    """NIQE of candidate images, each distinct image scored once per KB (the evaluation completes the same
    training rows against the same KB entries for every variant and repeat)."""

    def __init__(self, cache: dict, scorer):
        self.cache, self.scorer = cache, scorer

    def __call__(self, images: list) -> np.ndarray:
        keys = [hashlib.sha1(im.tobytes()).hexdigest() for im in images]
        todo = [(k, im) for k, im in zip(keys, images) if k not in self.cache]
        if todo:
            for (k, _), v in zip(todo, self.scorer([im for _, im in todo])):
                self.cache[k] = float(v)
        return np.array([self.cache[k] for k in keys], np.float32)


def completion_batch(task: str, rows: np.ndarray, data: EvalData, neigh, pseudo: np.ndarray) -> dict:
    """The completion stages' batch (``rag4dmc.actors.complete.completion_batch``) for masked training rows ``rows``
    of ``task``: an i2t row observed its image (its embedding is the query), a t2i row its text."""
    from rag4dmc.actors.complete import completion_batch as stage_batch
    from rag4dmc.pipeline.schema import TASK_I2T

    texts = data.train.column("text").to_pylist()
    return stage_batch(task, [f"train:{i}" for i in rows], [None if task == TASK_I2T else texts[i] for i in rows],
                       [None] * len(rows), neigh.ids, neigh.fused, neigh.cross, pseudo)


def complete_variant(vkb: VariantKB, data: EvalData, name: str, cfg: EvalConfig, encoder, niqe=None) -> dict:
    """Complete the masked training rows against ``vkb`` with the job's completion stages (``CompleteTexts``,
    ``CompleteImages``) and nearest-neighbour generators, on the variant's retrieval.

    Per generated modality: ``rows`` (training rows), ``generated`` (the chosen values), ``emb``, ``entries``
    (the chosen KB rows), ``settings`` and ``cands``: per row the candidate entries (best retrieved first),
    their selection scores and the chosen index. A row the stage fails (nothing usable retrieved) stays
    incomplete, as the job fails it.
    """
    from rag4dmc.actors.complete import CompleteImages, CompleteTexts
    from rag4dmc.actors.images import load_image
    from rag4dmc.actors.stage import apply
    from rag4dmc.pipeline.config import GeneratorConfig
    from rag4dmc.pipeline.core.selection import wants_niqe

    kb = vkb.kb
    out: dict = {}
    # The stage names candidates by entry id; here an entry's id is its KB row, so candidates map back to rows.
    entries = kb.entries.set_column(kb.entries.column_names.index("id"), "id",
                                    pa.array([str(i) for i in range(kb.entries.num_rows)], pa.string()))
    texts = kb.entries.column("text").to_pylist()
    generator = GeneratorConfig(text_backend="nn", image_backend="nn")
    for task, observed, rows in ((TASK_I2T, "image", np.flatnonzero(data.lose_text)),
                                 (TASK_T2I, "text", np.flatnonzero(data.lose_image))):
        if rows.size == 0:
            continue
        rcfg, scfg, settings = variant_configs(name, vkb, cfg, task)
        model = confidence_model(kb.manifest.get("calibration"), task) if VARIANTS[name].get("calibrated") else None
        threshold = confident_threshold(kb.manifest.get("calibration"), task, cfg.evaluation.confident_precision) \
            if VARIANTS[name].get("confident") else 0.0
        if threshold is None:  # said in the variant's settings: it then keeps every completion, as RAG4DMC does
            log.warning("RAG4DMC (confident), %s: the KB has no confidence model; every completion is kept", task)
            settings = {**settings, "min_confidence": "none: the KB has no confidence model"}
            threshold = 0.0
        query = (data.train_img if observed == "image" else data.train_txt)[rows]
        pseudo = kb.pseudo(query, observed)
        neigh = kb.retrieve(query, observed, rcfg)
        if task == TASK_I2T:
            stage = CompleteTexts(generator, scfg, cfg.encoder, entries, confidence=model, min_confidence=threshold)
        else:
            if niqe is None:  # no NIQE at hand: ranked by cosine alone
                scfg = scfg.model_copy(update={"image_quality": "none"})
            stage = CompleteImages(generator, scfg, cfg.encoder, entries,
                                   niqe=_CachedNiqe(vkb.niqe, niqe) if wants_niqe(scfg) else None,
                                   confidence=model, min_confidence=threshold)
        stage.ensure_setup()
        done = apply(stage, completion_batch(task, rows, data, neigh, pseudo))
        if threshold:
            settings = {**settings, "min_confidence": threshold}
        kept, chosen, cands_all, confidence = [], [], [], []
        for r in range(len(rows)):
            if done["task"][r] == TASK_FAILED or done["status"][r] == STATUS_ABSTAINED:
                continue
            confidence.append(float(done["confidence"][r]))
            entry_rows = [int(e) for e in done["candidate_ids"][r]]
            best = int(done["chosen"][r])
            kept.append(r)
            chosen.append(entry_rows[best])
            cands_all.append((entry_rows, [float(x) for x in done["candidate_scores"][r]], best))
        generated = "text" if observed == "image" else "image"
        values = [texts[i] for i in chosen] if generated == "text" else kb.images(chosen)
        if vkb.raw is not None:
            emb = vkb.raw[generated][chosen]
        elif generated == "text":
            emb = encoder.encode_texts(values)
        else:
            emb = encoder.encode_images([load_image(b) for b in values])
        out[generated] = {"rows": rows[kept], "generated": values, "emb": emb, "cands": cands_all,
                          "entries": np.asarray(chosen, np.int64), "settings": settings,
                          "confidence": np.asarray(confidence, np.float64), "abstained": int(
                              sum(s == STATUS_ABSTAINED for s in done["status"]))}
    return out


def score_variant(data: EvalData, completion: dict | None, keep_all: bool, heads: HeadConfig,
                  niqe=None, niqe_sample: int = 64, entry_labels: np.ndarray | None = None) -> dict:
    """Completion quality against the truth, label agreement, and downstream recall on the test split."""
    img, txt = data.train_img.copy(), data.train_txt.copy()
    observed = ~(data.lose_image | data.lose_text)
    use = np.ones(len(img), bool) if keep_all else observed.copy()
    truth_labels = (np.asarray(data.train.column(LABEL_COLUMN).to_pylist(), dtype=object)
                    if LABEL_COLUMN in data.train.column_names else None)
    metrics: dict = {}
    if completion is not None:
        if "text" in completion:
            c = completion["text"]
            truth = [data.train.column("text")[int(i)].as_py() for i in c["rows"]]
            metrics.update(bleu4=bleu4(c["generated"], truth), cider=cider(c["generated"], truth),
                           text_cosine=mean_cosine(c["emb"], data.train_txt[c["rows"]]))
            txt[c["rows"]] = c["emb"]
            use[c["rows"]] = True
        if "image" in completion:
            c = completion["image"]
            metrics["image_cosine"] = mean_cosine(c["emb"], data.train_img[c["rows"]])
            if niqe is not None:
                from rag4dmc.actors.images import load_image

                sample = c["generated"][:niqe_sample]
                metrics["niqe"] = float(np.nanmean(niqe([load_image(b) for b in sample]))) if sample else None
            img[c["rows"]] = c["emb"]
            use[c["rows"]] = True
        if truth_labels is not None and entry_labels is not None:
            for generated, metric in (("text", "i2t_label"), ("image", "t2i_label")):
                if generated in completion and len(completion[generated]["rows"]):
                    c = completion[generated]
                    metrics[metric] = float(np.mean(entry_labels[c["entries"]] == truth_labels[c["rows"]]))
    model = train_heads(img[use], txt[use], heads)
    metrics.update(evaluate_heads(model, data.test_img, data.test_txt))
    metrics["train_pairs"] = int(use.sum())
    return metrics


def variant_settings(name: str, cfg: EvalConfig, missing_rate: float, completion: dict | None = None) -> dict:
    """Everything that defines variant ``name`` in this run (what the table's setting columns show)."""
    spec = VARIANTS[name]
    settings: dict = {"missing_rate": missing_rate, "image_loss_ratio": cfg.evaluation.image_loss_ratio,
                      "kb": spec["kb"]}
    if spec["kb"] is None:
        return settings | {"training_data": spec["training_data"]}
    settings |= {"kb_content": KB_DESCRIPTIONS[spec["kb"]], "retrieval": spec["mode"],
                 "n_results": cfg.retrieval.n_results, "lambda_cos": cfg.selection.lambda_cos,
                 "lambda_quality": cfg.selection.lambda_quality, "training_data": "complete + completed pairs"}
    if spec["mode"] == "fusion":  # top_k and alpha shape only the two-stage fusion
        settings |= {"top_k": cfg.retrieval.top_k, "alpha": cfg.retrieval.alpha}
    for generated, task in (("text", TASK_I2T), ("image", TASK_T2I)):  # what each direction actually ran with
        if completion and generated in completion:
            settings[task] = completion[generated]["settings"]
    return settings


def run_variant(name: str, data: EvalData, kbs: dict, cfg: EvalConfig, encoder, heads: HeadConfig,
                niqe=None) -> VariantResult:
    t0 = time.perf_counter()
    spec = VARIANTS[name]
    if spec["kb"] is None:
        metrics = score_variant(data, None, keep_all=(name == "complete"), heads=heads)
        return VariantResult(name, spec["label"], variant_settings(name, cfg, data.missing_rate), metrics,
                             seconds=time.perf_counter() - t0)
    vkb = kbs[spec["kb"]]
    comp = complete_variant(vkb, data, name, cfg, encoder, niqe)
    metrics = score_variant(data, comp, keep_all=False, heads=heads, niqe=niqe,
                            niqe_sample=cfg.evaluation.niqe_sample, entry_labels=vkb.labels)
    log.info("missing rate %g, variant %s: %s", data.missing_rate, name, metrics)
    return VariantResult(name, spec["label"], variant_settings(name, cfg, data.missing_rate, comp), metrics, comp,
                         spec["kb"], time.perf_counter() - t0)


def run_evaluation(data: EvalData, cfg: EvalConfig, encoder, heads: HeadConfig = HeadConfig(), niqe=None,
                   with_sweeps: bool = False) -> dict:
    """Every requested variant at ``data``'s missing rate (and the sweeps when asked), with their settings."""
    t0 = time.perf_counter()
    ev = cfg.evaluation
    names = list(ev.variants)
    uses = {VARIANTS[n]["kb"] for n in names + ([ev.sweep_variant] if with_sweeps and ev.sweeps else [])}
    kbs = build_variant_kbs(data, cfg, {k for k in uses if k} | {"purified"})
    results = [run_variant(name, data, kbs, cfg, encoder, heads, niqe) for name in names]
    fused = next((r for r in results if r.name == "rag4dmc"), None)
    truth_labels = (np.asarray(data.train.column(LABEL_COLUMN).to_pylist(), dtype=object)
                    if LABEL_COLUMN in data.train.column_names else None)
    confidence = {"calibration": calibration_checks(kbs["purified"].kb.manifest.get("calibration")),
                  "label_agreement": label_agreement_by_coverage(fused and fused.completion, kbs["purified"].labels,
                                                                 truth_labels)}
    sweeps = []
    if with_sweeps:
        for sweep_name, values in ev.sweeps.items():
            points = []
            for value in values:
                swept = cfg.swept(sweep_name, value)
                r = run_variant(ev.sweep_variant, data, kbs, swept, encoder, heads, niqe)
                points.append({"value": value, "settings": r.settings, "metrics": r.metrics})
            sweeps.append({"name": sweep_name, "key": SWEEP_KEYS[sweep_name], "variant": ev.sweep_variant,
                           "label": VARIANTS[ev.sweep_variant]["label"], "missing_rate": data.missing_rate,
                           "points": points})
    return {"missing_rate": data.missing_rate, "data": data, "variants": results, "kbs": kbs, "sweeps": sweeps,
            "purification": kbs["purified"].kb.report, "kb_rows": {k: len(v.kb) for k, v in kbs.items()},
            "confidence": confidence,
            "masked": {"image": int(data.lose_image.sum()), "text": int(data.lose_text.sum()),
                       "complete": int((~(data.lose_image | data.lose_text)).sum())},
            "seconds": time.perf_counter() - t0}


def evaluate(splits: list[EvalData], cfg: EvalConfig, encoder, niqe=None, heads: HeadConfig = HeadConfig(),
             meta: dict | None = None) -> dict:
    """Every repeat, missing rate and variant; the sweeps at the first rate of the first repeat: the payload.

    ``splits`` holds one split (not masked) per repeat. The payload holds ``variants`` (one entry per missing
    rate and variant: name, label, missing_rate, settings, metrics (means), ci, values per repeat, paired
    differences against the references), ``orderings`` and their ``findings`` in words, ``runs`` (per rate:
    knowledge-base sizes, masked rows, purification report of the first repeat), ``sweeps`` and ``examples``
    (with image thumbnails, for the HTML report only).
    """
    t0 = time.perf_counter()
    ev = cfg.evaluation
    runs: list[list[dict]] = []
    for rep, data in enumerate(splits):
        per_rate = []
        for i, rate in enumerate(ev.missing_rates):
            masked = mask(data, rate, ev.image_loss_ratio, ev.seed + rep)
            run = run_evaluation(masked, cfg, encoder, heads, niqe, with_sweeps=(rep == 0 and i == 0))
            run["by_name"] = {r.name: r for r in run["variants"]}
            if rep > 0 or i > 0:  # only the first rate's knowledge bases and completions feed the examples
                run["kbs"] = {}
                for r in run["variants"]:
                    r.completion = None
            per_rate.append(run)
        runs.append(per_rate)
        log.info("evaluation repeat %d of %d done", rep + 1, len(splits))
    primary = runs[0][0]
    entries = aggregate(runs, list(ev.variants))
    found = orderings(entries)
    data = splits[0]
    return {
        "meta": meta or {},
        "encoder": data.encoder_name,
        "config": cfg.model_dump(mode="json"),
        "rows": {"train": data.train.num_rows, "test": len(data.test_img), "external": data.external.num_rows},
        "missing_rates": list(ev.missing_rates),
        "repeats": len(splits),
        "variants": entries,
        "orderings": found,
        "findings": orderings_text(found, {n: VARIANTS[n]["label"] for n in VARIANTS}),
        "runs": [{"missing_rate": run["missing_rate"], "kb_rows": run["kb_rows"], "masked": run["masked"],
                  "purification": finite(run["purification"]), "seconds": round(run["seconds"], 3)}
                 for run in runs[0]],
        "confidence": [{"missing_rate": rate, "repeats": [finite(per_rate[i]["confidence"]) for per_rate in runs]}
                       for i, rate in enumerate(ev.missing_rates)],
        "sweeps": [s | {"points": [p | {"metrics": finite(p["metrics"])} for p in s["points"]]}
                   for s in primary["sweeps"]],
        "examples": examples(primary["data"], primary, ev.examples, ev.thumbnail_px),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def evaluate_datasets(data: str, external: str, out: str, cfg: EvalConfig, data_format: str = "auto"
                      ) -> tuple[dict, dict[str, str]]:
    """``rag4dmc evaluate``: read, embed, evaluate every repeat, rate and variant, write the report; (payload, files)."""
    from rag4dmc.actors.factory import create_encoder
    from rag4dmc.actors.niqe import NiqeScorer

    ev = cfg.evaluation
    complete, left_data = read_pairs(data, cfg, data_format)
    ext, left_external = read_pairs(external, cfg, data_format)
    encoder = create_encoder(cfg.encoder, cfg.storage.fsspec_options())
    complete, ci, ct, bad = embed_pairs(complete, encoder, cfg.encoder)
    left_data += bad
    ext, ei, et, bad = embed_pairs(ext, encoder, cfg.encoder)
    left_external += bad
    for name, left in (("data", left_data), ("external", left_external)):
        if left:
            log.warning("%d %s rows or shards left out of the evaluation: %s", len(left), name,
                        "; ".join(left[:LEFT_OUT_SHOWN]))
    niqe = NiqeScorer(cfg.selection.niqe_params) if cfg.selection.image_quality == "niqe" else None
    meta = {"data": data, "external": external, "data rows or shards left out": len(left_data),
            "external rows or shards left out": len(left_external),
            "left out, first reasons": (left_data + left_external)[:LEFT_OUT_SHOWN]}
    splits = [split(complete, ci, ct, ext, ei, et, encoder.name, ev.test_fraction, ev.seed + rep)
              for rep in range(ev.repeats)]
    payload = evaluate(splits, cfg, encoder, niqe, meta=meta)
    return payload, write_report(payload, out, cfg.storage)


def write_report(payload: dict, out: str | Path, storage: StorageConfig = StorageConfig()) -> dict[str, str]:
    """metrics.json (the payload without the example images), metrics.md and report.html under ``out``.

    ``out`` is a local folder or an ``s3://`` prefix; returns the three paths by kind.
    """
    from rag4dmc.pipeline.evaluation.report import render_html
    from rag4dmc.pipeline.io.storage import Storage

    root = str(out).rstrip("/")
    paths = {"metrics": f"{root}/metrics.json", "table": f"{root}/metrics.md", "html": f"{root}/report.html"}
    metrics = {k: v for k, v in payload.items() if k != "examples"}
    store = Storage(storage)
    store.write_bytes(paths["metrics"], json.dumps(metrics, indent=2, allow_nan=False).encode())
    store.write_bytes(paths["table"], markdown_report(payload).encode())
    store.write_bytes(paths["html"], render_html(payload).encode())
    return paths
