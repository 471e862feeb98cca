"""``rag4dmc evaluate``: the paper's table of variants on the user's own complete data.

A held-out test split is set aside, the training split is masked at a missing rate (half of the masked
rows lose the image, half the text), and each variant completes the training split. Variants are
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
I2T/T2I recall on the test split. Completion uses the nearest-neighbour generator (offline).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline import kb as kbmod
from pipeline.config import KBConfig, RetrievalConfig, SelectionConfig
from pipeline.downstream import HeadConfig, evaluate_heads, train_heads
from pipeline.metrics import bleu4, cider, mean_cosine
from pipeline.selection import consensus_bleu, text_score

log = logging.getLogger(__name__)

VARIANTS = {
    "drop": {"label": "Drop-Incomplete", "kb": None},
    "direct": {"label": "Direct (mapped NN)", "kb": "internal", "mode": "mapped"},
    "vanilla": {"label": "Vanilla-RAG", "kb": "internal", "mode": "intra"},
    "combined": {"label": "Combined-RAG", "kb": "raw", "mode": "intra"},
    "kfa": {"label": "KFA-RAG", "kb": "purified", "mode": "intra"},
    "rag4dmc": {"label": "RAG4DMC", "kb": "purified", "mode": "fusion"},
    "complete": {"label": "Complete (upper bound)", "kb": None},
}


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


@dataclass
class VariantResult:
    name: str
    label: str
    settings: dict
    metrics: dict = field(default_factory=dict)
    examples: list = field(default_factory=list)


def prepare(complete: pa.Table, external: pa.Table, missing_rate: float, encoder, test_fraction: float = 0.2,
            image_fraction: float = 0.5, seed: int = 0) -> EvalData:
    """Split, mask and embed (once) the evaluation data."""
    from actors.images import load_image

    rng = np.random.default_rng(seed)
    n = complete.num_rows
    order = rng.permutation(n)
    n_test = max(2, int(round(test_fraction * n)))
    test, train = complete.take(order[:n_test]), complete.take(order[n_test:])
    masked = rng.permutation(train.num_rows)[: int(round(missing_rate * train.num_rows))]
    k = int(round(image_fraction * len(masked)))
    lose_image, lose_text = np.zeros(train.num_rows, bool), np.zeros(train.num_rows, bool)
    lose_image[masked[:k]], lose_text[masked[k:]] = True, True

    def emb(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        images = [load_image(b) for b in table.column("image").to_pylist()]
        return encoder.encode_images(images), encoder.encode_texts(table.column("text").to_pylist())

    ti, tt = emb(train)
    si, st = emb(test)
    ei, et = emb(external)
    return EvalData(train, lose_image, lose_text, ti, tt, si, st, external, ei, et, encoder.name)


def build_variant_kbs(data: EvalData, cfg: KBConfig) -> dict[str, kbmod.KnowledgeBase]:
    """The three knowledge bases the variants use: internal only, + raw external, + purified external."""
    observed = ~(data.lose_image | data.lose_text)
    internal = data.train.filter(pa.array(observed))
    emb = {"image": data.train_img[observed], "text": data.train_txt[observed]}
    ext = {"image": data.ext_img, "text": data.ext_txt}
    return {
        "internal": kbmod.build_knowledge_base(internal, emb, None, None, cfg),
        "raw": kbmod.build_knowledge_base(internal, emb, data.external, ext, cfg.model_copy(update={"purify": False})),
        "purified": kbmod.build_knowledge_base(internal, emb, data.external, ext, cfg),
    }


def complete_variant(kb: kbmod.KnowledgeBase, data: EvalData, mode: str, retrieval: RetrievalConfig,
                     selection: SelectionConfig, encoder) -> dict:
    """Complete the masked training rows against ``kb``; the chosen entries and their embeddings."""
    from actors.images import load_image

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
            ids = [i for i in neigh.ids[r] if i >= 0]
            if observed == "image":  # i2t: candidates are the neighbours' texts
                cand = [texts[i] for i in ids]
                score = text_score(neigh.cross[r][: len(ids)], consensus_bleu(cand), selection.lambda_cos,
                                   selection.lambda_quality)
            else:  # t2i: the neighbours' images ranked by the cosine term
                score = neigh.cross[r][: len(ids)]
            best = int(np.argmax(score))
            chosen.append(ids[best])
            cands_all.append((ids, [float(s) for s in score], best))
        if observed == "image":
            gen = [texts[i] for i in chosen]
            out["text"] = {"rows": rows, "generated": gen, "emb": encoder.encode_texts(gen), "cands": cands_all}
        else:
            gen = [images[i] for i in chosen]
            out["image"] = {"rows": rows, "generated": gen,
                            "emb": encoder.encode_images([load_image(b) for b in gen]), "cands": cands_all}
    return out


def score_variant(data: EvalData, completion: dict | None, keep_all: bool, heads: HeadConfig,
                  niqe=None) -> dict:
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

                sample = c["generated"][:64]
                metrics["niqe"] = float(np.mean(niqe([load_image(b) for b in sample])))
            img[c["rows"]] = c["emb"]
            use[c["rows"]] = True
    model = train_heads(img[use], txt[use], heads)
    metrics.update(evaluate_heads(model, data.test_img, data.test_txt))
    metrics["train_pairs"] = int(use.sum())
    return metrics


def run_evaluation(data: EvalData, kb_cfg: KBConfig, retrieval: RetrievalConfig, selection: SelectionConfig,
                   encoder, variants: list[str], heads: HeadConfig = HeadConfig(), niqe=None) -> dict:
    """Every requested variant's metrics, with the settings that define it."""
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    t0 = time.perf_counter()
    kbs = build_variant_kbs(data, kb_cfg)
    results = []
    for name in variants:
        spec = VARIANTS[name]
        settings = {k: v for k, v in spec.items() if k != "label"}
        if spec["kb"] is None:
            metrics = score_variant(data, None, keep_all=(name == "complete"), heads=heads)
            results.append(VariantResult(name, spec["label"], settings, metrics))
            continue
        if spec["mode"] == "fusion":
            settings["alpha"] = retrieval.alpha
        settings["top_k"], settings["n_results"] = retrieval.top_k, retrieval.n_results
        comp = complete_variant(kbs[spec["kb"]], data, spec["mode"], retrieval, selection, encoder)
        metrics = score_variant(data, comp, keep_all=False, heads=heads, niqe=niqe)
        results.append(VariantResult(name, spec["label"], settings, metrics, _examples(data, kbs[spec["kb"]], comp)))
        log.info("variant %s: %s", name, metrics)
    return {"variants": results, "purification": kbs["purified"].report, "seconds": time.perf_counter() - t0,
            "encoder": data.encoder_name, "kb_rows": {k: len(v) for k, v in kbs.items()}}


def _examples(data: EvalData, kb: kbmod.KnowledgeBase, comp: dict, n: int = 4) -> list[dict]:
    out = []
    ids, texts, images = (kb.entries.column(c).to_pylist() for c in ("id", "text", "image"))
    for modality, c in comp.items():
        for j in range(min(n, len(c["rows"]))):
            row = int(c["rows"][j])
            cand_ids, scores, best = c["cands"][j]
            out.append({
                "generated": modality,
                "query_text": data.train.column("text")[row].as_py() if modality == "image" else None,
                "query_image": data.train.column("image")[row].as_py() if modality == "text" else None,
                "truth_text": data.train.column("text")[row].as_py(),
                "truth_image": data.train.column("image")[row].as_py(),
                "candidates": [{"id": ids[i], "text": texts[i], "image": images[i], "score": s}
                               for i, s in zip(cand_ids, scores)],
                "chosen": best,
            })
    return out


METRIC_COLUMNS = ("bleu4", "cider", "text_cosine", "image_cosine", "niqe", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5",
                  "train_pairs")


def markdown_table(results: list[VariantResult]) -> str:
    """The variants table, one row per variant, every metric a column."""
    head = "| variant | " + " | ".join(METRIC_COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(METRIC_COLUMNS) + 1)]
    for r in results:
        cells = []
        for m in METRIC_COLUMNS:
            v = r.metrics.get(m)
            cells.append("-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)))
        lines.append(f"| {r.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(result: dict, out: str | Path, meta: dict) -> dict[str, str]:
    """metrics.json, metrics.md and report.html in ``out``."""
    from pipeline.report import render_html

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = result["variants"]
    payload = {"meta": meta, "encoder": result["encoder"], "kb_rows": result["kb_rows"],
               "variants": [{"name": r.name, "label": r.label, "settings": r.settings, "metrics": r.metrics}
                            for r in results],
               "purification": result["purification"], "seconds": result["seconds"]}
    (out / "metrics.json").write_text(json.dumps(payload, indent=2, default=float))
    table = markdown_table(results)
    (out / "metrics.md").write_text(table + "\n")
    (out / "report.html").write_text(render_html(payload, results, table))
    return {"metrics": str(out / "metrics.json"), "table": str(out / "metrics.md"), "html": str(out / "report.html")}
