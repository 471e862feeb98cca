"""Evaluation metrics: BLEU-4 and CIDEr for captions, embedding cosine, and retrieval recall@K."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

_PUNCT = re.compile(r"[^\w\s]")


def coco_tokenize(text: str) -> str:
    """Lower-case, punctuation-free, single-spaced: what the COCO caption tools score."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def bleu4(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 (sacrebleu) of hypotheses against one reference each, in [0, 1]."""
    import sacrebleu

    if not hypotheses:
        return float("nan")
    return sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score / 100.0


def cider(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """CIDEr-D (pycocoevalcap's implementation) of hypotheses against one reference each."""
    from pycocoevalcap.cider.cider import Cider

    if not hypotheses:
        return float("nan")
    gts = {i: [coco_tokenize(r)] for i, r in enumerate(references)}
    res = {i: [coco_tokenize(h)] for i, h in enumerate(hypotheses)}
    score, _ = Cider().compute_score(gts, res)
    return float(score)


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine between paired rows of a and b."""
    if len(a) == 0:
        return float("nan")
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return float(np.einsum("nd,nd->n", a, b).mean())


def recall_at_k(similarity: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """R@K for one-to-one pairs: row i's true match is column i."""
    true = np.diagonal(similarity)[:, None]
    rank = (similarity > true).sum(axis=1)  # how many columns beat the true one
    return {k: float((rank < k).mean()) for k in ks}
