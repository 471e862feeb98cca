"""Self-calibration at knowledge-base build: held-out internal pairs choose retrieval, selection and purification.

The paper leaves alpha, k, n, the selection weights and the purification thresholds as "heuristic weights
that need tuning per domain". The internal complete pairs are ground truth the method already has, so a
slice of them is hidden and each held-out pair is completed from the rest, the way the job completes a row
with the nearest-neighbour generator: hide one modality, retrieve (stage 1 top-k, fused rerank), select among
the n retrieved entries. Completion fidelity is

    F_i2t(q) = cos(E_T(chosen), z_T(q)) + w * BLEU(text(chosen), text(q))
    F_t2i(q) = cos(E_I(chosen), z_I(q))

in the encoder's own space (the chosen entry's unaligned embedding against the truth). Every grid point is
scored on the same held-out pairs, so the differences between points are paired; the mean and a 95%
confidence interval of each are reported, and a two-fold cross-fit (choose on one half, score on the other)
says how much of the winner's margin is selection luck.

Order (coordinate ascent, each step cheap): the alignment's settings (proximal step, best or last round) at
the default thresholds; then tau_cent x tau_inst with that alignment (k-means runs once; thresholds only
re-cut its similarities); then, on the chosen knowledge base, alpha x top_k x n x the selection lambdas,
separately per direction. The build's fit (:func:`rag4dmc.pipeline.kb.build_fit.fit`) then trains the mapping on
its whole sample and purifies with the chosen settings.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from rag4dmc.pipeline.config import CalibrationConfig, KBConfig, RetrievalConfig, SelectionConfig, Stream
from rag4dmc.pipeline.core import confidence
from rag4dmc.pipeline.core.confidence import FEATURES, completion_features, faithful
from rag4dmc.pipeline.core.knn import normalize_rows
from rag4dmc.pipeline.core.mapping import MIN_TRAIN_PAIRS, CrossModalMapper, train_mapping
from rag4dmc.pipeline.core.retrieval import (
    MODALITIES,
    Neighbours,
    fusion_scores,
    merge_candidates,
    rank_by,
    shard_candidates,
)
from rag4dmc.pipeline.core.selection import consensus_bleu, image_score, sentence_bleu, text_score
from rag4dmc.pipeline.core.significance import mean_ci, paired
from rag4dmc.pipeline.kb import purification
from rag4dmc.pipeline.kb.settings import CALIBRATED_RETRIEVAL, CALIBRATED_SELECTION

log = logging.getLogger(__name__)

TASKS = {"i2t": ("image", "text"), "t2i": ("text", "image")}  # task -> (observed, generated)


# ------------------------------------------------------------------------------------------------
# Pure pieces
# ------------------------------------------------------------------------------------------------


def holdout_rows(n: int, cfg: CalibrationConfig) -> np.ndarray | None:
    """Rows of ``n`` internal pairs to hold out (sorted), or None when too few pairs would remain on either side."""
    size = min(cfg.max_holdout, max(cfg.min_holdout, int(round(cfg.holdout_fraction * n))))
    if size < cfg.min_holdout or n - size < max(MIN_TRAIN_PAIRS, size):
        return None
    return np.sort(np.random.default_rng([cfg.seed, 7]).choice(n, size, replace=False))


def cross_fit(fidelity: np.ndarray, seed: int = 0) -> float:
    """Two-fold cross-fitted fidelity of "pick the best grid point": chosen on one half, scored on the other.

    ``fidelity`` is [grid points, queries]; the result is an honest estimate of what the chosen setting
    achieves on pairs it was not chosen on (the in-sample maximum is biased upwards by the choice)."""
    q = fidelity.shape[1]
    fold = np.random.default_rng([seed, 11]).permutation(q) < q // 2
    scores = []
    for a, b in ((fold, ~fold), (~fold, fold)):
        if a.any() and b.any():
            scores.append(fidelity[int(np.argmax(fidelity[:, a].mean(1))), b].mean() * b.sum())
    return float(np.sum(scores) / q) if scores else float("nan")


def stage1_pool(shards, mapping: CrossModalMapper, query: np.ndarray, observed: str, k: int) -> Neighbours:
    """Stage-1 candidates of each query over every shard (the job's shard search and merge), k per query."""
    pseudo = mapping.image_to_text(query) if observed == "image" else mapping.text_to_image(query)
    cfg = RetrievalConfig(top_k=k, n_results=1)
    return merge_candidates([shard_candidates(s, query, pseudo, observed, cfg) for s in shards], k)


def rerank_pool(pool: Neighbours, alpha: float, top_k: int, n: int) -> Neighbours:
    """Stage 2 on the first ``top_k`` stage-1 candidates: the n best by sim_fuse (the job's rerank)."""
    ids, intra, cross = pool.ids[:, :top_k], pool.intra[:, :top_k], pool.cross[:, :top_k]
    return rank_by(ids, fusion_scores(intra, cross, alpha), intra, cross, n)


# ------------------------------------------------------------------------------------------------
# Scoring one knowledge base on the held-out pairs
# ------------------------------------------------------------------------------------------------


@dataclass
class HeldOut:
    """The held-out pairs: their embeddings (the queries and the truth) and texts."""

    image: np.ndarray
    text: np.ndarray
    texts: list[str]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class Candidates:
    """What a knowledge base offers the calibration: its indexed shards, the mapping, and per entry its text,
    its unaligned embeddings (to score fidelity against the truth) and, for NIQE, its image bytes."""

    shards: list
    mapping: CrossModalMapper
    texts: list[str]
    raw: dict[str, np.ndarray]
    image_of: Callable[[int], bytes | None] | None = None  # entry -> its image bytes, read when NIQE needs it
    # entry -> its source row ("internal"/"external", row): the knowledge bases tried share these caches
    source_of: Callable[[int], tuple[str, int]] = lambda e: ("entry", e)
    _niqe: dict[tuple[str, int], float] = field(default_factory=dict)
    _fidelity: dict[tuple, float] = field(default_factory=dict)

    def niqe(self, ids: np.ndarray, scorer) -> np.ndarray:
        """NIQE of entries ``ids`` (any shape), each computed once; NaN without a scorer or an image."""
        from rag4dmc.actors.images import InputError, load_image

        out = np.full(ids.shape, np.nan, np.float32)
        if scorer is None or self.image_of is None:
            return out
        for idx, e in np.ndenumerate(ids):
            e = int(e)
            if e < 0:
                continue
            key = self.source_of(e)
            if key not in self._niqe:
                try:
                    self._niqe[key] = scorer.score(load_image(self.image_of(e)))
                except InputError:
                    self._niqe[key] = float("nan")
            out[idx] = self._niqe[key]
        return out

    def fidelity(self, task: str, held: HeldOut, chosen: np.ndarray, bleu_weight: float) -> np.ndarray:
        """F_task(q) of each held-out query q completed with entry ``chosen[q]`` (-1: nothing, fidelity 0)."""
        generated = TASKS[task][1]
        truth = held.text if generated == "text" else held.image
        out = np.zeros(len(chosen), np.float32)
        for q, e in enumerate(chosen):
            e = int(e)
            if e < 0:
                continue
            key = (task, q, self.source_of(e))
            if key not in self._fidelity:
                value = float(self.raw[generated][e] @ truth[q])
                if generated == "text" and bleu_weight:
                    value += bleu_weight * sentence_bleu(self.texts[e], held.texts[q])
                self._fidelity[key] = value
            out[q] = self._fidelity[key]
        return out


class _SetCache:
    """Consensus BLEU of each query's candidate set, once per distinct set (grid points share most sets)."""

    def __init__(self, texts: list[str]):
        self.texts, self.cache = texts, {}

    def bleu(self, ids: np.ndarray) -> np.ndarray:
        out = np.zeros(ids.shape, np.float32)
        for q, row in enumerate(ids):
            key = tuple(int(e) for e in row if e >= 0)
            if len(key) < 2:
                continue
            if key not in self.cache:
                self.cache[key] = consensus_bleu([self.texts[e] for e in key])
            out[q, : len(key)] = self.cache[key]
        return out


def _quality(generated: str, ranked: Neighbours, cands: Candidates, sets: _SetCache, niqe) -> np.ndarray:
    """The selection's quality term of each reranked candidate: consensus BLEU of a query's candidate texts (none
    for a single candidate), or the NIQE of its candidate images."""
    if generated == "text":
        return sets.bleu(ranked.ids) if ranked.ids.shape[1] > 1 else np.zeros(ranked.ids.shape, np.float32)
    return cands.niqe(ranked.ids, niqe)


def _selection_scores(generated: str, ranked: Neighbours, quality: np.ndarray, sel: SelectionConfig) -> np.ndarray:
    """s_T or s_I (eq. 8-9) of each reranked candidate, as the job's completion stage scores it."""
    score = text_score if generated == "text" else image_score
    return score(ranked.cross, quality, sel, ranked.fused)


def _choose(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The entry with the highest selection score per query (padding never wins)."""
    scores = np.where(ids >= 0, scores, -np.inf)
    return np.take_along_axis(ids, scores.argmax(1)[:, None], 1)[:, 0]


def score_grid(task: str, cands: Candidates, held: HeldOut, cal: CalibrationConfig, base: SelectionConfig,
               retrieval: RetrievalConfig, niqe=None) -> tuple[list[dict], np.ndarray]:
    """Every (alpha, top_k, n, lambda_quality, lambda_retrieval) point of the grid on the held-out pairs of one
    direction: a list of points with their mean fidelity and CI, and the [points, queries] fidelity matrix.

    The configured retrieval and selection values are added to the grid, so the default is always scored."""
    observed, generated = TASKS[task]
    query = held.image if observed == "image" else held.text
    n_kb = len(cands.texts)
    alphas = sorted({*cal.alpha, retrieval.alpha})
    top_ks = sorted({min(k, n_kb) for k in (*cal.top_k, retrieval.top_k)})
    ns = sorted({*cal.n_results, retrieval.n_results})
    lqs = sorted({*cal.lambda_quality, base.lambda_quality})
    if generated == "image" and niqe is None:
        lqs = [0.0]  # no NIQE here: the quality term is zero whatever its weight
    lrs = sorted({*cal.lambda_retrieval, base.lambda_retrieval})
    pool = stage1_pool(cands.shards, cands.mapping, query, observed, max(top_ks))
    sets = _SetCache(cands.texts)
    points, rows = [], []
    for alpha, top_k, n in itertools.product(alphas, top_ks, ns):
        if n > top_k:
            continue
        ranked = rerank_pool(pool, alpha, top_k, n)
        quality = _quality(generated, ranked, cands, sets, niqe)
        for lq, lr in itertools.product(lqs, lrs):
            sel = base.model_copy(update={"lambda_quality": lq, "lambda_retrieval": lr})
            score = _selection_scores(generated, ranked, quality, sel)
            fid = cands.fidelity(task, held, _choose(score, ranked.ids), cal.bleu_weight)
            mean, ci = mean_ci(fid)
            points.append({"alpha": alpha, "top_k": top_k, "n_results": n, "lambda_quality": lq,
                           "lambda_retrieval": lr, "fidelity": mean, "ci": ci})
            rows.append(fid)
    return points, np.stack(rows)


def kb_fidelity(cands: Candidates, held: HeldOut, cal: CalibrationConfig, retrieval: RetrievalConfig,
                selection: SelectionConfig, niqe=None) -> tuple[dict[str, float], np.ndarray]:
    """Mean fidelity of each direction and their mean at one retrieval and selection setting, and the
    per-query fidelities of both directions (i2t queries then t2i queries) for paired comparisons."""
    one = cal.model_copy(update={"alpha": [retrieval.alpha], "top_k": [retrieval.top_k],
                                 "n_results": [retrieval.n_results], "lambda_quality": [selection.lambda_quality],
                                 "lambda_retrieval": [selection.lambda_retrieval]})
    out, per_query = {}, []
    for task in TASKS:
        points, fid = score_grid(task, cands, held, one, selection, retrieval, niqe)
        out[task] = points[0]["fidelity"]
        per_query.append(fid[0])
    out["mean"] = float(np.mean([out[t] for t in TASKS]))
    return out, np.concatenate(per_query)


def completions_at(task: str, cands: Candidates, held: HeldOut, retrieval: RetrievalConfig,
                   selection: SelectionConfig, niqe=None) -> tuple[Neighbours, np.ndarray]:
    """The held-out queries of one direction completed at one setting, as the job completes a row: the n reranked
    neighbours of each and their selection scores ([queries, n]; padding ids are -1)."""
    observed, generated = TASKS[task]
    query = held.image if observed == "image" else held.text
    top_k = min(retrieval.top_k, len(cands.texts))
    pool = stage1_pool(cands.shards, cands.mapping, query, observed, top_k)
    ranked = rerank_pool(pool, retrieval.alpha, top_k, min(retrieval.n_results, top_k))
    quality = _quality(generated, ranked, cands, _SetCache(cands.texts), niqe)
    return ranked, _selection_scores(generated, ranked, quality, selection)


def confidence_data(task: str, cands: Candidates, held: HeldOut, retrieval: RetrievalConfig,
                    selection: SelectionConfig, share: float, niqe=None) -> tuple[np.ndarray, np.ndarray]:
    """The confidence features of each held-out query completed at the chosen setting, and whether its
    completion is faithful (closer to the hidden truth than ``share`` of the calibration's KB): [queries, features]
    and [queries]. Queries that retrieved nothing are left out (the job fails such rows)."""
    generated = TASKS[task][1]
    truth = held.text if generated == "text" else held.image
    ranked, score = completions_at(task, cands, held, retrieval, selection, niqe)
    rows, chosen = [], []
    for q in range(len(held)):
        valid = ranked.ids[q] >= 0
        if not valid.any():
            continue
        best = int(np.argmax(np.where(valid, score[q], -np.inf)))
        rows.append((q, completion_features(ranked.fused[q][valid], ranked.cross[q][valid], score[q][valid],
                                            int(valid[:best].sum()))))
        chosen.append(int(ranked.ids[q, best]))
    if not rows:
        return np.zeros((0, len(FEATURES))), np.zeros(0, bool)
    queries = np.array([q for q, _ in rows])
    entries = cands.raw[generated]
    y = faithful(entries[np.array(chosen)], truth[queries], entries, share)
    return np.stack([x for _, x in rows]), y


def confidence_record(x: np.ndarray, y: np.ndarray, cal: CalibrationConfig) -> dict | None:
    """The confidence model of one direction (fitted on every held-out pair) and how well it is calibrated on pairs
    it did not see (cross-fitted): ECE, AUROC, the reliability diagram and the coverage x precision table."""
    if len(y) < 2 * cal.confidence_folds:
        return None
    p = confidence.cross_fitted(x, y, cal.confidence_folds, cal.seed)
    return {"model": confidence.fit(x, y).to_dict(), "faithful_share": cal.faithful_share, "pairs": int(len(y)),
            "faithful_rate": float(y.mean()), "ece": confidence.ece(p, y), "auroc": confidence.auroc(p, y),
            "reliability": confidence.reliability(p, y),
            "coverage_precision": confidence.coverage_precision(p, y, confidence.THRESHOLDS)}


def beats(candidate: np.ndarray, default: np.ndarray) -> tuple[bool, float, float]:
    """Whether a setting's per-query fidelity is higher than the default's beyond noise (the paired 95%
    interval excludes zero), with the paired difference and its half-width. Calibration leaves a default
    only on such evidence: among many settings, some beat it on the held-out pairs by luck alone."""
    diff, ci, _ = paired(candidate, default)
    return bool(np.isfinite(ci) and diff - ci > 0), diff, ci


# ------------------------------------------------------------------------------------------------
# The whole calibration
# ------------------------------------------------------------------------------------------------


def _is(point: dict, retrieval: RetrievalConfig, selection: SelectionConfig, top_k: int) -> bool:
    """Whether a grid point is the configured setting (``top_k``: the configured one, clamped to the KB)."""
    return (point["alpha"] == retrieval.alpha and point["top_k"] == top_k
            and point["n_results"] == retrieval.n_results and point["lambda_quality"] == selection.lambda_quality
            and point["lambda_retrieval"] == selection.lambda_retrieval)


def choose_direction(task: str, points: list[dict], fidelity: np.ndarray, retrieval: RetrievalConfig,
                     selection: SelectionConfig, seed: int) -> dict:
    """The chosen setting of one direction, with the default's and top-1's fidelity beside it."""
    best = int(np.argmax([p["fidelity"] for p in points]))
    top_k = min(retrieval.top_k, max(p["top_k"] for p in points))  # grid values are clamped to the KB's size
    default = next((p for p in points if _is(p, retrieval, selection, top_k)), None)
    top1 = max((p for p in points if p["n_results"] == 1 and p["alpha"] == retrieval.alpha),
               key=lambda p: p["fidelity"], default=None)
    gain = {}
    reason = "the best grid point"
    if default is not None:
        d = points.index(default)
        better, gain["gain_over_default"], gain["gain_over_default_ci"] = beats(fidelity[best], fidelity[d])
        if not better:
            best, reason = d, "the default: no grid point beats it beyond noise"
    chosen = points[best]
    return {
        "retrieval": {k: chosen[k] for k in CALIBRATED_RETRIEVAL},
        "selection": {k: chosen[k] for k in CALIBRATED_SELECTION},
        "fidelity": chosen["fidelity"], "ci": chosen["ci"],
        "cross_fitted_fidelity": cross_fit(fidelity, seed),
        "default": default, "top1": top1, "chosen_because": reason, **gain,
        "measure": "cos(E_T(chosen), z_T) + BLEU" if TASKS[task][1] == "text" else "cos(E_I(chosen), z_I)",
    }


def _niqe_scorer(selection: SelectionConfig):
    from rag4dmc.actors.niqe import NiqeScorer
    from rag4dmc.pipeline.core.selection import wants_niqe
    from rag4dmc.pipeline.setup_data import NiqeParamsMissing

    if not wants_niqe(selection):
        return None
    try:
        return NiqeScorer(selection.niqe_params)
    except NiqeParamsMissing as exc:
        log.warning("calibration scores image candidates without NIQE: %s", exc)
        return None


ImageOf = Callable[[int], "bytes | None"]  # a row of a side -> its image bytes (None: no image)


def _rows_of(image_of: ImageOf, rows: np.ndarray) -> ImageOf:
    """``image_of`` of a subsample: row i of the subsample is row ``rows[i]`` of the side."""
    return lambda i: image_of(int(rows[i]))


def calibrate(internal_texts: list[str], internal_images: ImageOf | None, internal: dict[str, np.ndarray],
              external_texts: list[str] | None, external_images: ImageOf | None,
              external: dict[str, np.ndarray] | None, cfg: KBConfig,
              retrieval: RetrievalConfig = RetrievalConfig(), selection: SelectionConfig = SelectionConfig()
              ) -> dict | None:
    """Choose purification, retrieval and selection settings on held-out internal pairs (module docstring).

    ``internal`` / ``external`` map "image" and "text" to unit-norm, row-aligned embeddings (external ones
    unaligned); ``*_images`` give a row's image bytes, asked only for the candidates NIQE scores. Returns the calibration record (None when the internal pairs are too few to hold any out):
    ``purification`` (the chosen filter and align keys, and every scored candidate), ``directions`` (per task
    the chosen retrieval and selection keys, their fidelity and CI, the default's and top-1's, the cross-fit)
    and ``grid`` (every scored point per task)."""
    cal = cfg.calibration
    t0 = time.perf_counter()
    n = len(internal_texts)
    held_rows = holdout_rows(n, cal)
    if held_rows is None:
        log.info("calibration skipped: %d internal pairs are too few to hold %d out", n, cal.min_holdout)
        return None
    rng = np.random.default_rng([cal.seed, Stream.CALIBRATION_SAMPLE])
    rest = np.setdiff1d(np.arange(n), held_rows)
    if len(rest) > cal.max_rows:  # a bounded random sample stands in for the rest of a large corpus
        rest = np.sort(rng.choice(rest, cal.max_rows, replace=False))
    if external is not None and len(external["image"]) > cal.max_rows:
        ext_rows = np.sort(rng.choice(len(external["image"]), cal.max_rows, replace=False))
        external = {m: v[ext_rows] for m, v in external.items()}
        external_texts = [external_texts[i] for i in ext_rows]
        external_images = None if external_images is None else _rows_of(external_images, ext_rows)
    held = HeldOut(internal["image"][held_rows], internal["text"][held_rows], [internal_texts[i] for i in held_rows])
    part = {m: internal[m][rest] for m in internal}
    mapping, _ = train_mapping(part["image"], part["text"], cfg.mapping)
    niqe = _niqe_scorer(selection)
    rest_texts = [internal_texts[i] for i in rest]
    niqe_cache: dict = {}
    fidelity_cache: dict = {}

    def candidates(keep: np.ndarray | None, aligned: dict[str, np.ndarray] | None) -> Candidates:
        vectors, raw, texts = dict(part), dict(part), list(rest_texts)
        kept = np.flatnonzero(keep) if keep is not None else np.zeros(0, np.int64)
        if kept.size:
            for m in MODALITIES:
                vectors[m] = np.concatenate([part[m], aligned[m][kept]])
                raw[m] = np.concatenate([part[m], external[m][kept]])
            texts += [external_texts[i] for i in kept]

        def source_of(e: int) -> tuple[str, int]:
            return ("internal", int(rest[e])) if e < len(rest) else ("external", int(kept[e - len(rest)]))

        def image_of(e: int) -> bytes | None:
            side, row = source_of(e)
            images = internal_images if side == "internal" else external_images
            return None if images is None else images(row)

        vectors = {m: np.ascontiguousarray(v, np.float32) for m, v in vectors.items()}
        return Candidates(purification.build_shards(vectors, cfg), mapping, texts, raw, image_of, source_of, niqe_cache,
                          fidelity_cache)

    record: dict = {"holdout_pairs": len(held), "train_pairs": len(rest), "purification": None,
                    "external_rows": 0 if external is None else len(external["image"])}
    if external is not None and external_texts and cfg.use_external and cfg.purify:
        record["purification"], keep, aligned = _calibrate_purification(part, external, held, cfg, retrieval,
                                                                         selection, niqe, candidates)
        cands = candidates(keep, aligned)
    elif external is not None and external_texts and cfg.use_external:
        cands = candidates(np.ones(len(external_texts), bool), external)
    else:
        cands = candidates(None, None)
    record["directions"], record["grid"] = {}, {}
    for task in TASKS:
        points, fid = score_grid(task, cands, held, cal, selection, retrieval, niqe)
        record["directions"][task] = choose_direction(task, points, fid, retrieval, selection, cal.seed)
        record["grid"][task] = points
        chosen = record["directions"][task]
        x, y = confidence_data(task, cands, held, retrieval.model_copy(update=chosen["retrieval"]),
                               selection.model_copy(update=chosen["selection"]), cal.faithful_share, niqe)
        chosen["confidence"] = confidence_record(x, y, cal)
        log.info("calibration %s: %s (fidelity %.4f +- %.4f; the default %s)", task,
                 record["directions"][task]["retrieval"] | record["directions"][task]["selection"],
                 record["directions"][task]["fidelity"], record["directions"][task]["ci"],
                 (record["directions"][task]["default"] or {}).get("fidelity"))
    record["niqe"] = niqe is not None
    record["seconds"] = round(time.perf_counter() - t0, 3)
    return record


def _first_default(values: list, default) -> list:
    """``values`` with the configured default first: on a tie the default is kept."""
    return [default] + sorted(v for v in set(values) if v != default)


def _calibrate_purification(part, external, held, cfg: KBConfig, retrieval, selection, niqe, candidates):
    """Alignment settings at the configured thresholds, then the thresholds with that alignment; the chosen
    settings' record, kept mask and aligned external rows. A setting replaces the default only if it scores
    strictly higher."""
    cal = cfg.calibration
    filt = purification.filter_external(part, external, cfg)
    tried = []
    # Alignment: the configured settings unless another beats them beyond noise (paired over held-out queries).
    default_vec, best = None, None
    for proximal in _first_default(cal.align_proximal, cfg.align.proximal):
        acfg = cfg.model_copy(update={"align": cfg.align.model_copy(update={"proximal": proximal})})
        _, results = purification.align_external(part, external, filt["keep"], acfg)
        for pick in _first_default(cal.align_pick, cfg.align.pick):
            aligned = {m: external[m] if results[m] is None else
                       normalize_rows(external[m] @ getattr(results[m], pick), f"aligned external {m}")
                       for m in MODALITIES}
            score, vec = kb_fidelity(candidates(filt["keep"], aligned), held, cal, retrieval, selection, niqe)
            tried.append({"step": "align", "proximal": proximal, "pick": pick, **score})
            default_vec = vec if default_vec is None else default_vec
            if best is None or (score["mean"] > best[0] and beats(vec, default_vec)[0]):
                best = (score["mean"], {"proximal": proximal, "pick": pick}, aligned)
    _, best_align, best_w = best
    # Thresholds, with that alignment: again the configured ones unless beaten beyond noise.
    default_vec, best = None, None
    for tau_cent, tau_inst in itertools.product(_first_default(cal.tau_cent, cfg.filter.tau_cent),
                                                _first_default(cal.tau_inst, cfg.filter.tau_inst)):
        keep = purification.threshold_filter(filt["results"], tau_cent, tau_inst, cfg.filter.modality)
        score, vec = kb_fidelity(candidates(keep, best_w), held, cal, retrieval, selection, niqe)
        tried.append({"step": "filter", "tau_cent": tau_cent, "tau_inst": tau_inst, "kept": int(keep.sum()), **score})
        default_vec = vec if default_vec is None else default_vec
        if best is None or (score["mean"] > best[0] and beats(vec, default_vec)[0]):
            best = (score["mean"], {"tau_cent": tau_cent, "tau_inst": tau_inst}, keep)
    best_tau_score, best_tau, best_keep = best
    no_external, _ = kb_fidelity(candidates(None, None), held, cal, retrieval, selection, niqe)
    record = {"filter": best_tau, "align": best_align, "fidelity": best_tau_score,
              "default_fidelity": next(t["mean"] for t in tried if t["step"] == "filter"),
              "internal_only_fidelity": no_external["mean"], "tried": tried}
    return record, best_keep, best_w
# ------------------------------------------------------------------------------------------------
# Using a calibration
# ------------------------------------------------------------------------------------------------


def calibration_summary(calibration: dict | None) -> dict | None:
    """What the manifest keeps of a calibration: the chosen settings per direction and their fidelity beside
    the default's (the full grids stay in report.json)."""
    if calibration is None:
        return None
    keep = ("retrieval", "selection", "fidelity", "ci", "cross_fitted_fidelity", "gain_over_default",
            "gain_over_default_ci", "confidence")
    out = {"holdout_pairs": calibration["holdout_pairs"],
           "directions": {t: {k: d.get(k) for k in keep} | {"default_fidelity": (d["default"] or {}).get("fidelity"),
                                                             "top1_fidelity": (d["top1"] or {}).get("fidelity")}
                          for t, d in calibration["directions"].items()}}
    if calibration["purification"] is not None:
        out["purification"] = {k: calibration["purification"][k] for k in ("filter", "align", "fidelity",
                                                                            "default_fidelity", "internal_only_fidelity")}
    return out
