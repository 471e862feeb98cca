"""How sure a completion is: label-free features of a row's retrieval and selection, a logistic model of whether
the completion is faithful, and the checks of that model (reliability, ECE, AUROC, coverage x precision).

A completion of a row whose ``generated`` modality was hidden is *faithful* when it is closer to the hidden truth,
in the encoder's space, than ``share`` of the knowledge base's entries are (:func:`faithful`). At KB build the
calibration completes held-out internal pairs, so it knows the truth; the model it fits (:func:`fit`) maps the
features below, which the job has for every row without any label, to the probability that the row is faithful.
The job applies it with :func:`predict` (numpy only: no scikit-learn in the completion actors).

Pure functions: no Ray, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# The features, in order: what the completion stage knows of a row once it has chosen (none needs a label).
FEATURES = (
    "top_fused",  # sim_fuse of the best retrieved example (eq. 7)
    "fused_margin",  # its lead over the second one: a clear winner or a tie
    "mean_fused",  # sim_fuse averaged over the n retrieved: how good the neighbourhood is as a whole
    "top_cross",  # the best cross term cos(pseudo-embedding, example's other modality) (eq. 7's second term)
    "cross_spread",  # best minus worst cross term: disagreement among the retrieved examples
    "chosen_score",  # the chosen candidate's selection score (s_T or s_I, eq. 8-9)
    "score_margin",  # its lead over the runner-up candidate
)
# The thresholds of the coverage x precision table that `kb build` prints and the report holds.
THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def completion_features(fused: np.ndarray, cross: np.ndarray, scores: np.ndarray, chosen: int) -> np.ndarray:
    """The :data:`FEATURES` of one row: its retrieved examples' fused and cross scores (best first, padding
    dropped) and its candidates' selection scores with the chosen one's index."""
    fused, cross, scores = (np.asarray(v, np.float64).ravel() for v in (fused, cross, scores))
    if fused.size == 0 or scores.size == 0:
        raise ValueError("a row with no retrieved example or no candidate has no confidence features")
    others = np.delete(scores, chosen)
    return np.array([
        fused.max(),
        fused.max() - np.sort(fused)[-2] if fused.size > 1 else 0.0,
        fused.mean(),
        cross.max(),
        cross.max() - cross.min(),
        scores[chosen],
        scores[chosen] - others.max() if others.size else 0.0,
    ])


def faithful(completion: np.ndarray, truth: np.ndarray, entries: np.ndarray, share: float) -> np.ndarray:
    """Whether each completion is closer to its truth than ``share`` of the KB's entries are (the definition of a
    faithful completion): ``completion`` and ``truth`` are [q, d], ``entries`` [n, d], all unit-norm."""
    own = np.einsum("qd,qd->q", completion, truth)
    beaten = (truth @ entries.T < own[:, None]).mean(axis=1)
    return beaten >= share


@dataclass(frozen=True)
class ConfidenceModel:
    """A logistic model on standardised :data:`FEATURES`: p = sigmoid(((x - mean) / scale) . coef + intercept)."""

    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    features: tuple[str, ...] = FEATURES

    def to_dict(self) -> dict:
        return {"features": list(self.features), "mean": list(self.mean), "scale": list(self.scale),
                "coef": list(self.coef), "intercept": self.intercept}

    @classmethod
    def from_dict(cls, d: dict) -> ConfidenceModel:
        if tuple(d["features"]) != FEATURES:
            raise ValueError(f"the knowledge base's confidence model uses features {d['features']}, this version "
                             f"computes {list(FEATURES)}: rebuild the KB with this version")
        return cls(tuple(d["mean"]), tuple(d["scale"]), tuple(d["coef"]), float(d["intercept"]))


def predict(model: ConfidenceModel, x: np.ndarray) -> np.ndarray:
    """P(faithful) of each row of features ``x`` ([rows, len(FEATURES)])."""
    z = (np.atleast_2d(x) - np.asarray(model.mean)) / np.asarray(model.scale)
    return 1.0 / (1.0 + np.exp(-(z @ np.asarray(model.coef) + model.intercept)))


def fit(x: np.ndarray, y: np.ndarray, c: float = 1.0) -> ConfidenceModel:
    """The L2-regularised logistic model of ``y`` (faithful or not) on features ``x``. With one class only, the
    model is that class's rate (smoothed away from 0 and 1): there is nothing to separate."""
    from sklearn.linear_model import LogisticRegression

    x, y = np.asarray(x, np.float64), np.asarray(y, bool)
    mean, scale = x.mean(0), x.std(0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    if y.all() or not y.any():
        rate = (y.sum() + 0.5) / (len(y) + 1.0)
        return ConfidenceModel(tuple(mean), tuple(scale), (0.0,) * x.shape[1], float(np.log(rate / (1 - rate))))
    lr = LogisticRegression(C=c, max_iter=1000).fit((x - mean) / scale, y)
    return ConfidenceModel(tuple(mean), tuple(scale), tuple(float(v) for v in lr.coef_[0]), float(lr.intercept_[0]))


def cross_fitted(x: np.ndarray, y: np.ndarray, folds: int, seed: int, c: float = 1.0) -> np.ndarray:
    """Each row's P(faithful) from a model fitted on the other folds: what the reliability and ECE are measured on
    (the model applied to the pairs it was fitted on would look better calibrated than it is)."""
    n = len(y)
    fold = np.random.default_rng([seed, 17]).permutation(n) % max(2, min(folds, n))
    out = np.empty(n)
    for f in np.unique(fold):
        test = fold == f
        out[test] = predict(fit(x[~test], y[~test], c), x[test])
    return out


def reliability(p: np.ndarray, y: np.ndarray, bins: int = 10) -> list[dict]:
    """The reliability diagram: per equal-width bin of confidence, its rows, mean confidence and faithful rate."""
    p, y = np.asarray(p, np.float64), np.asarray(y, np.float64)
    which = np.minimum((p * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        inside = which == b
        out.append({"lo": b / bins, "hi": (b + 1) / bins, "rows": int(inside.sum()),
                    "confidence": float(p[inside].mean()) if inside.any() else None,
                    "faithful": float(y[inside].mean()) if inside.any() else None})
    return out


def ece(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: the rows-weighted mean of |faithful rate - mean confidence| over the bins."""
    n = len(p)
    return float(sum(b["rows"] / n * abs(b["faithful"] - b["confidence"]) for b in reliability(p, y, bins)
                     if b["rows"])) if n else float("nan")


def auroc(score: np.ndarray, y: np.ndarray) -> float:
    """P(a random positive scores above a random negative), ties counted half (Mann-Whitney); NaN with one class."""
    from scipy.stats import rankdata

    y = np.asarray(y, bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if not pos or not neg:
        return float("nan")
    ranks = rankdata(np.asarray(score, np.float64))
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def coverage_precision(p: np.ndarray, y: np.ndarray, thresholds: Sequence[float]) -> list[dict]:
    """Per threshold t: the share of rows with confidence >= t (kept) and the faithful rate among them."""
    p, y = np.asarray(p), np.asarray(y, bool)
    out = []
    for t in thresholds:
        kept = p >= t
        out.append({"threshold": float(t), "coverage": float(kept.mean()) if len(p) else float("nan"),
                    "precision": float(y[kept].mean()) if kept.any() else None})
    return out


def by_coverage(p: np.ndarray, agree: np.ndarray, coverages: Sequence[float]) -> list[dict]:
    """Per share c of :func:`coverage_precision`'s rows taken the other way round: the most confident share c of
    the rows (at least one; ties in row order), how many, the rate of ``agree`` among them and their lowest
    confidence."""
    p, agree = np.asarray(p, np.float64), np.asarray(agree, bool)
    order = np.argsort(-p, kind="stable")
    out = []
    for share in coverages:
        kept = order[: max(1, int(round(share * len(order))))]
        out.append({"coverage": float(share), "rows": int(len(kept)), "agreement": float(agree[kept].mean()),
                    "min_confidence": float(p[kept].min())})
    return out


def threshold_for(table: list[dict], precision: float) -> float | None:
    """The lowest threshold of a :func:`coverage_precision` table whose kept rows are faithful at ``precision`` or
    more (None: none is)."""
    hit = [row["threshold"] for row in table if row["precision"] is not None and row["precision"] >= precision]
    return min(hit) if hit else None
