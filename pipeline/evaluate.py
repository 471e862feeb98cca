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
    rag4dmc     RAG4DMC: purified KB + two-stage fusion retrieval
    complete    Complete: the true training data (upper bound)

Completions are scored against the truth (BLEU-4, CIDEr, embedding cosine; NIQE for images when its
parameters are given) and by downstream utility: contrastive heads trained on each variant's data,
I2T/T2I recall on the test split. Completion uses the nearest-neighbour generator (offline): the
candidates are the n retrieved neighbours' other modality, scored as the job scores them. Sweeps
evaluate one variant at each value of one setting (fusion alpha, top-k, n, selection lambda), the
others as configured, at the first missing rate.

Everything is embedded once; each missing rate builds its own knowledge bases from the rows it leaves
complete. The result is one payload (:func:`evaluate`) that :func:`write_report` turns into
``metrics.json``, ``metrics.md`` and ``report.html``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline import kb as kbmod
from pipeline.config import (
    SWEEP_KEYS,
    VARIANT_NAMES,
    EncoderConfig,
    EvalConfig,
    RetrievalConfig,
    SelectionConfig,
    StorageConfig,
)
from pipeline.downstream import HeadConfig, evaluate_heads, train_heads
from pipeline.mapping import MIN_TRAIN_PAIRS
from pipeline.metrics import bleu4, cider, mean_cosine
from pipeline.selection import consensus_bleu, text_score

log = logging.getLogger(__name__)

# kb: which knowledge base the variant retrieves from (None: it completes nothing); mode: retrieval.mode.
VARIANTS: dict[str, dict] = {
    "drop": {"label": "Drop-Incomplete", "kb": None, "training_data": "complete pairs only"},
    "direct": {"label": "Direct (mapped NN)", "kb": "internal", "mode": "mapped"},
    "vanilla": {"label": "Vanilla-RAG", "kb": "internal", "mode": "intra"},
    "combined": {"label": "Combined-RAG", "kb": "raw", "mode": "intra"},
    "kfa": {"label": "KFA-RAG", "kb": "purified", "mode": "intra"},
    "rag4dmc": {"label": "RAG4DMC", "kb": "purified", "mode": "fusion"},
    "complete": {"label": "Complete (upper bound)", "kb": None, "training_data": "the true training data"},
}
assert tuple(VARIANTS) == VARIANT_NAMES, "evaluate.VARIANTS and config.VariantName must list the same variants"
KB_DESCRIPTIONS = {"internal": "internal", "raw": "internal + raw external", "purified": "internal + purified external"}

# Every metric: what it measures and whether higher is better (None: a count, not a quality).
METRICS: dict[str, tuple[str, bool | None]] = {
    "bleu4": ("BLEU-4 of completed texts against the true texts", True),
    "cider": ("CIDEr-D of completed texts against the true texts", True),
    "text_cosine": ("cosine of completed and true text embeddings", True),
    "image_cosine": ("cosine of completed and true image embeddings", True),
    "niqe": ("NIQE of completed images (lower is more natural)", False),
    "i2t_r1": ("downstream image->text recall@1 on the test split", True),
    "i2t_r5": ("downstream image->text recall@5 on the test split", True),
    "t2i_r1": ("downstream text->image recall@1 on the test split", True),
    "t2i_r5": ("downstream text->image recall@5 on the test split", True),
    "train_pairs": ("image-text pairs the downstream model trained on", None),
}
METRIC_COLUMNS = tuple(METRICS)
MIN_TEST_PAIRS = 2  # recall ranks each test pair against the others
LEFT_OUT_SHOWN = 5  # reasons for left-out rows quoted in the log and in metrics.json


class EvaluationError(ValueError):
    """The data cannot support the requested evaluation; the message says what to change."""


@dataclass
class EvalData:
    """Everything embedded once: training rows (with truth and mask), test pairs, external pairs."""

    train: pa.Table
    lose_image: np.ndarray
    lose_text: np.ndarray
    train_img: np.ndarray
    train_txt: np.ndarray
    test_img: np.ndarray
    test_txt: np.ndarray
    external: pa.Table
    ext_img: np.ndarray
    ext_txt: np.ndarray
    encoder_name: str
    missing_rate: float = 0.0


@dataclass
class VariantResult:
    name: str
    label: str
    settings: dict
    metrics: dict = field(default_factory=dict)
    completion: dict | None = None  # what complete_variant returned (for the examples)
    kb: str | None = None
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------------
# Data: read, embed, split, mask
# ------------------------------------------------------------------------------------------------


def read_pairs(path: str, cfg: EvalConfig, data_format: str = "auto") -> tuple[pa.Table, list[str]]:
    """The rows at ``path`` with both modalities (id, image bytes, text), and what was left out and why.

    Images given as a path or URI are fetched (with the storage options). Rows that cannot be used (a
    missing modality, an input error, an unreadable image URI) and shards that cannot be read are left
    out and described, one message each.
    """
    from actors.images import InputError, read_uri
    from pipeline.datasets import read_dataset

    options = cfg.storage.fsspec_options()
    table, problems = read_dataset(path, cfg.columns, options, data_format)
    ids, images, texts = [], [], []
    for row in table.to_pylist():
        if row["input_error"]:
            problems.append(f"{row['id']}: {row['input_error']}")
            continue
        image = row["image"]
        if image is None and row["image_uri"]:
            try:
                image = read_uri(row["image_uri"], options)
            except InputError as exc:
                problems.append(f"{row['id']}: {exc}")
                continue
        if image is None or row["text"] is None:
            problems.append(f"{row['id']}: no {'image' if image is None else 'text'} (evaluation needs complete pairs)")
            continue
        ids.append(row["id"])
        images.append(image)
        texts.append(row["text"])
    return pa.table({"id": pa.array(ids, pa.string()), "image": pa.array(images, pa.binary()),
                     "text": pa.array(texts, pa.string())}), problems


def embed_pairs(table: pa.Table, encoder, cfg: EncoderConfig = EncoderConfig()
                ) -> tuple[pa.Table, np.ndarray, np.ndarray, list[str]]:
    """Image and text embeddings of ``table``'s rows; rows that do not decode are left out (and described).

    Images are decoded ``cfg.batch_size`` at a time, with ``cfg.max_image_pixels`` as the size limit.
    """
    from actors.images import InputError, load_image, validate_text

    batch = cfg.batch_size
    keep: list[int] = []
    problems: list[str] = []
    img_parts = [np.zeros((0, encoder.image_dim), np.float32)]
    txt_parts = [np.zeros((0, encoder.text_dim), np.float32)]
    ids, images, texts = (table.column(c).to_pylist() for c in ("id", "image", "text"))
    for start in range(0, table.num_rows, batch):
        pictures, captions = [], []
        for i in range(start, min(start + batch, table.num_rows)):
            try:
                picture = load_image(images[i], max_pixels=cfg.max_image_pixels)
                captions.append(validate_text(texts[i]))
            except InputError as exc:
                problems.append(f"{ids[i]}: {exc}")
                continue
            pictures.append(picture)
            keep.append(i)
        img_parts.append(encoder.encode_images(pictures))
        txt_parts.append(encoder.encode_texts(captions))
    return table.take(keep), np.concatenate(img_parts), np.concatenate(txt_parts), problems


def split(complete: pa.Table, complete_img: np.ndarray, complete_txt: np.ndarray, external: pa.Table,
          ext_img: np.ndarray, ext_txt: np.ndarray, encoder_name: str, test_fraction: float = 0.2,
          seed: int = 0) -> EvalData:
    """Set aside the test split; nothing is masked yet (see :func:`mask`)."""
    n = complete.num_rows
    n_test = max(MIN_TEST_PAIRS, int(round(test_fraction * n)))
    if n - n_test < MIN_TRAIN_PAIRS:
        raise EvaluationError(f"{n} complete pairs are too few: {n_test} go to the test split and the training "
                              f"split needs at least {MIN_TRAIN_PAIRS}; give more complete data")
    order = np.random.default_rng([seed, 0]).permutation(n)
    test, train = order[:n_test], order[n_test:]
    none = np.zeros(len(train), bool)
    return EvalData(complete.take(train), none, none.copy(), complete_img[train], complete_txt[train],
                    complete_img[test], complete_txt[test], external, ext_img, ext_txt, encoder_name)


def mask(data: EvalData, missing_rate: float, image_fraction: float = 0.5, seed: int = 0) -> EvalData:
    """``data`` with ``round(missing_rate * n_train)`` training rows losing a modality.

    One permutation of the training rows is cut at every rate, so the rows masked at a lower rate are
    also masked at a higher one; the first ``image_fraction`` of the masked rows lose the image.
    """
    n = data.train.num_rows
    order = np.random.default_rng([seed, 1]).permutation(n)
    masked = order[: int(round(missing_rate * n))]
    n_image = int(round(image_fraction * len(masked)))
    lose_image, lose_text = np.zeros(n, bool), np.zeros(n, bool)
    lose_image[masked[:n_image]], lose_text[masked[n_image:]] = True, True
    observed = n - len(masked)
    if observed < MIN_TRAIN_PAIRS:
        raise EvaluationError(f"at missing rate {missing_rate:g} only {observed} of {n} training pairs stay "
                              f"complete; the knowledge base needs at least {MIN_TRAIN_PAIRS}: give more complete "
                              "data or a lower evaluation.missing_rates")
    return replace(data, lose_image=lose_image, lose_text=lose_text, missing_rate=missing_rate)


def prepare(complete: pa.Table, external: pa.Table, missing_rate: float, encoder, test_fraction: float = 0.2,
            image_fraction: float = 0.5, seed: int = 0) -> EvalData:
    """Embed, split and mask in one call (tables with id, image bytes and text)."""
    complete, ci, ct, _ = embed_pairs(complete, encoder)
    external, ei, et, _ = embed_pairs(external, encoder)
    data = split(complete, ci, ct, external, ei, et, encoder.name, test_fraction, seed)
    return mask(data, missing_rate, image_fraction, seed)


# ------------------------------------------------------------------------------------------------
# Variants
# ------------------------------------------------------------------------------------------------


@dataclass
class VariantKB:
    """A knowledge base and the encoder's own (unaligned) embeddings of its entries, row for row."""

    kb: kbmod.KnowledgeBase
    raw: dict[str, np.ndarray] | None  # None: entries could not be matched to the embedded data


def build_variant_kbs(data: EvalData, cfg: EvalConfig, needed: set[str] | None = None) -> dict[str, VariantKB]:
    """The knowledge bases the variants use: internal only, + raw external, + purified external."""
    needed = set(KB_DESCRIPTIONS) if needed is None else needed
    kb_cfg = cfg.kb_config()
    observed = ~(data.lose_image | data.lose_text)
    internal = data.train.filter(pa.array(observed))
    emb = {"image": data.train_img[observed], "text": data.train_txt[observed]}
    ext = {"image": data.ext_img, "text": data.ext_txt}
    external = data.external if data.external.num_rows else None
    configs = {"internal": (None, None, kb_cfg), "raw": (external, ext, kb_cfg.model_copy(update={"purify": False})),
               "purified": (external, ext, kb_cfg)}
    out = {}
    for name in KB_DESCRIPTIONS:
        if name in needed:
            kb = kbmod.build_knowledge_base(internal, emb, *configs[name])
            out[name] = VariantKB(kb, _raw_vectors(kb, emb, data))
    return out


def _raw_vectors(kb: kbmod.KnowledgeBase, internal: dict[str, np.ndarray], data: EvalData
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


def complete_variant(vkb: VariantKB, data: EvalData, mode: str, retrieval: RetrievalConfig,
                     selection: SelectionConfig, encoder) -> dict:
    """Complete the masked training rows against ``vkb``; the chosen entries and their embeddings.

    Per generated modality: ``rows`` (training rows), ``generated`` (the chosen values), ``emb``
    and ``cands``: per row the neighbour ids (best first), their selection scores and the chosen index.
    """
    from actors.images import load_image

    kb = vkb.kb
    rcfg = retrieval.model_copy(update={"mode": mode})
    out: dict = {}
    texts = kb.entries.column("text").to_pylist()
    images = kb.entries.column("image").to_pylist()
    for observed, rows in (("image", np.flatnonzero(data.lose_text)), ("text", np.flatnonzero(data.lose_image))):
        if rows.size == 0:
            continue
        query = (data.train_img if observed == "image" else data.train_txt)[rows]
        neigh = kb.retrieve(query, observed, rcfg)
        chosen, cands_all = [], []
        for r in range(len(rows)):
            ids = [int(i) for i in neigh.ids[r] if i >= 0]
            if observed == "image":  # i2t: candidates are the neighbours' texts
                cand = [texts[i] for i in ids]
                score = text_score(neigh.cross[r][: len(ids)], consensus_bleu(cand), selection.lambda_cos,
                                   selection.lambda_quality)
            else:  # t2i: the neighbours' images ranked by the cosine term
                score = neigh.cross[r][: len(ids)]
            best = int(np.argmax(score))
            chosen.append(ids[best])
            cands_all.append((ids, [float(s) for s in score], best))
        generated = "text" if observed == "image" else "image"
        values = [(texts if generated == "text" else images)[i] for i in chosen]
        if vkb.raw is not None:
            emb = vkb.raw[generated][chosen]
        elif generated == "text":
            emb = encoder.encode_texts(values)
        else:
            emb = encoder.encode_images([load_image(b) for b in values])
        out[generated] = {"rows": rows, "generated": values, "emb": emb, "cands": cands_all}
    return out


def score_variant(data: EvalData, completion: dict | None, keep_all: bool, heads: HeadConfig,
                  niqe=None, niqe_sample: int = 64) -> dict:
    """Completion quality against the truth, and downstream recall on the test split."""
    img, txt = data.train_img.copy(), data.train_txt.copy()
    observed = ~(data.lose_image | data.lose_text)
    use = np.ones(len(img), bool) if keep_all else observed.copy()
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
                from actors.images import load_image

                sample = c["generated"][:niqe_sample]
                metrics["niqe"] = float(np.mean(niqe([load_image(b) for b in sample])))
            img[c["rows"]] = c["emb"]
            use[c["rows"]] = True
    model = train_heads(img[use], txt[use], heads)
    metrics.update(evaluate_heads(model, data.test_img, data.test_txt))
    metrics["train_pairs"] = int(use.sum())
    return metrics


def variant_settings(name: str, cfg: EvalConfig, missing_rate: float) -> dict:
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
    return settings


def run_variant(name: str, data: EvalData, kbs: dict, cfg: EvalConfig, encoder, heads: HeadConfig,
                niqe=None) -> VariantResult:
    t0 = time.perf_counter()
    spec = VARIANTS[name]
    settings = variant_settings(name, cfg, data.missing_rate)
    if spec["kb"] is None:
        metrics = score_variant(data, None, keep_all=(name == "complete"), heads=heads)
        return VariantResult(name, spec["label"], settings, metrics, seconds=time.perf_counter() - t0)
    comp = complete_variant(kbs[spec["kb"]], data, spec["mode"], cfg.retrieval, cfg.selection, encoder)
    metrics = score_variant(data, comp, keep_all=False, heads=heads, niqe=niqe,
                            niqe_sample=cfg.evaluation.niqe_sample)
    log.info("missing rate %g, variant %s: %s", data.missing_rate, name, metrics)
    return VariantResult(name, spec["label"], settings, metrics, comp, spec["kb"], time.perf_counter() - t0)


def run_evaluation(data: EvalData, cfg: EvalConfig, encoder, heads: HeadConfig = HeadConfig(), niqe=None,
                   with_sweeps: bool = False) -> dict:
    """Every requested variant at ``data``'s missing rate (and the sweeps when asked), with their settings."""
    t0 = time.perf_counter()
    ev = cfg.evaluation
    names = list(ev.variants)
    uses = {VARIANTS[n]["kb"] for n in names + ([ev.sweep_variant] if with_sweeps and ev.sweeps else [])}
    kbs = build_variant_kbs(data, cfg, {k for k in uses if k} | {"purified"})
    results = [run_variant(name, data, kbs, cfg, encoder, heads, niqe) for name in names]
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
            "masked": {"image": int(data.lose_image.sum()), "text": int(data.lose_text.sum()),
                       "complete": int((~(data.lose_image | data.lose_text)).sum())},
            "seconds": time.perf_counter() - t0}


def evaluate(data: EvalData, cfg: EvalConfig, encoder, niqe=None, heads: HeadConfig = HeadConfig(),
             meta: dict | None = None) -> dict:
    """Every missing rate, every variant, the sweeps at the first rate: the report payload.

    ``data`` is split but not masked. The payload holds ``variants`` (one entry per missing rate and
    variant: name, label, missing_rate, settings, metrics), ``runs`` (per rate: knowledge-base sizes,
    masked rows, purification report), ``sweeps`` and ``examples`` (with image thumbnails, for the HTML
    report only).
    """
    t0 = time.perf_counter()
    ev = cfg.evaluation
    runs = []
    for i, rate in enumerate(ev.missing_rates):
        masked = mask(data, rate, ev.image_loss_ratio, ev.seed)
        runs.append(run_evaluation(masked, cfg, encoder, heads, niqe, with_sweeps=(i == 0)))
        if i > 0:  # only the first rate's knowledge bases and completions feed the examples
            runs[-1]["kbs"] = {}
            for r in runs[-1]["variants"]:
                r.completion = None
    primary = runs[0]
    return {
        "meta": meta or {},
        "encoder": data.encoder_name,
        "config": cfg.model_dump(mode="json"),
        "rows": {"train": data.train.num_rows, "test": len(data.test_img), "external": data.external.num_rows},
        "missing_rates": list(ev.missing_rates),
        "variants": [{"name": r.name, "label": r.label, "missing_rate": run["missing_rate"], "settings": r.settings,
                      "metrics": _finite(r.metrics), "seconds": round(r.seconds, 3)}
                     for run in runs for r in run["variants"]],
        "runs": [{"missing_rate": run["missing_rate"], "kb_rows": run["kb_rows"], "masked": run["masked"],
                  "purification": _finite(run["purification"]), "seconds": round(run["seconds"], 3)}
                 for run in runs],
        "sweeps": [s | {"points": [p | {"metrics": _finite(p["metrics"])} for p in s["points"]]}
                   for s in primary["sweeps"]],
        "examples": examples(primary["data"], primary, ev.examples, ev.thumbnail_px),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _finite(value):
    """``value`` with NaN and infinities as None (JSON has neither), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def evaluate_datasets(data: str, external: str, out: str, cfg: EvalConfig, data_format: str = "auto"
                      ) -> tuple[dict, dict[str, str]]:
    """``rag4dmc evaluate``: read, embed, evaluate every rate and variant, write the report; (payload, files)."""
    from actors.encoders import create_encoder

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
    niqe = None
    if cfg.selection.niqe_params:
        from pipeline.selection import NiqeScorer

        niqe = NiqeScorer(cfg.selection.niqe_params)
    meta = {"data": data, "external": external, "data rows or shards left out": len(left_data),
            "external rows or shards left out": len(left_external),
            "left out, first reasons": (left_data + left_external)[:LEFT_OUT_SHOWN]}
    split_data = split(complete, ci, ct, ext, ei, et, encoder.name, ev.test_fraction, ev.seed)
    payload = evaluate(split_data, cfg, encoder, niqe, meta=meta)
    return payload, write_report(payload, out, cfg.storage)


# ------------------------------------------------------------------------------------------------
# Examples
# ------------------------------------------------------------------------------------------------


def thumbnail(data: bytes, size: int) -> bytes:
    """``data`` as a PNG whose longer side is at most ``size`` pixels (the report embeds these)."""
    from actors.images import load_image

    picture = load_image(data)
    picture.thumbnail((size, size))
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()


def examples(data: EvalData, run: dict, n: int, thumb_px: int) -> list[dict]:
    """The same ``n`` masked rows (half lost their text, half their image) as every variant completed them.

    Each example: ``direction`` (i2t or t2i), the ``query`` (the observed modality), the ``truth``
    (the lost one) and per variant the top ``retrieved`` entry, the ``candidates`` with their scores
    and the index of the ``chosen`` one. Images are thumbnails.
    """
    thumbs: dict[bytes, bytes] = {}

    def thumb(b: bytes | None) -> bytes | None:
        if b is not None and b not in thumbs:
            thumbs[b] = thumbnail(b, thumb_px)
        return None if b is None else thumbs[b]

    columns = {name: {c: v.kb.entries.column(c) for c in ("id", "text", "image")} for name, v in run["kbs"].items()}

    def entry(kb: str, i: int, fields: tuple[str, ...]) -> dict:
        col = columns[kb]
        out = {"id": col["id"][i].as_py()}
        if "text" in fields:
            out["text"] = col["text"][i].as_py()
        if "image" in fields:
            out["image"] = thumb(col["image"][i].as_py())
        return out

    done = [r for r in run["variants"] if r.completion]
    train_ids, train_texts, train_images = (data.train.column(c).to_pylist() for c in ("id", "text", "image"))
    out = []
    for generated, direction, count in (("text", "i2t", (n + 1) // 2), ("image", "t2i", n // 2)):
        observed = "image" if generated == "text" else "text"
        rows = np.flatnonzero(data.lose_text if generated == "text" else data.lose_image)[:count]
        for j, row in enumerate(rows):
            truth = {"text": train_texts[row], "image": thumb(train_images[row])}
            example = {"id": train_ids[row], "direction": direction, "generated": generated,
                       "query": {observed: truth[observed]}, "truth": {generated: truth[generated]}, "variants": []}
            for r in done:
                c = r.completion[generated]
                assert int(c["rows"][j]) == row, "variants complete the masked rows in the same order"
                ids, scores, best = c["cands"][j]
                example["variants"].append({
                    "name": r.name, "label": r.label, "retrieved": entry(r.kb, ids[0], ("text", "image")),
                    "candidates": [entry(r.kb, i, (generated,)) | {"score": s} for i, s in zip(ids, scores)],
                    "chosen": best})
            out.append(example)
    return out


# ------------------------------------------------------------------------------------------------
# Tables and files
# ------------------------------------------------------------------------------------------------

SETTING_COLUMNS = {  # column -> how a variant's settings fill it
    "data / KB": lambda s: s.get("kb_content") or s.get("training_data", "-"),
    "retrieval": lambda s: s.get("retrieval", "-"),
    "alpha": lambda s: s.get("alpha"),
    "top_k": lambda s: s.get("top_k"),
    "n": lambda s: s.get("n_results"),
    "lambda": lambda s: s.get("lambda_quality"),
}


def format_value(v) -> str:
    """A table cell: floats to 3 decimals, missing values as '-'."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def table_columns(entries: list[dict]) -> tuple[list[str], list[str]]:
    """(setting columns, metric columns) for ``entries``: metrics no variant has are left out."""
    metrics = [m for m in METRIC_COLUMNS if any(e["metrics"].get(m) is not None for e in entries)]
    return list(SETTING_COLUMNS), metrics


def markdown_table(entries: list[dict]) -> str:
    """The variants table: one row per (missing rate, variant), its settings, then every metric."""
    settings, metrics = table_columns(entries)
    head = ["missing rate", "variant", *settings, *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        cells = [f"{e['missing_rate']:g}", e["label"], *(format_value(SETTING_COLUMNS[c](e["settings"]))
                                                         for c in settings),
                 *(format_value(e["metrics"].get(m)) for m in metrics)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(payload: dict, out: str | Path, storage: StorageConfig = StorageConfig()) -> dict[str, str]:
    """metrics.json (the payload without the example images), metrics.md and report.html under ``out``.

    ``out`` is a local folder or an ``s3://`` prefix; returns the three paths by kind.
    """
    from pipeline.report import render_html
    from pipeline.storage import Storage

    root = str(out).rstrip("/")
    paths = {"metrics": f"{root}/metrics.json", "table": f"{root}/metrics.md", "html": f"{root}/report.html"}
    metrics = {k: v for k, v in payload.items() if k != "examples"}
    store = Storage(storage)
    store.write_bytes(paths["metrics"], json.dumps(metrics, indent=2, allow_nan=False).encode())
    store.write_bytes(paths["table"], (markdown_table(payload["variants"]) + "\n").encode())
    store.write_bytes(paths["html"], render_html(payload).encode())
    return paths
