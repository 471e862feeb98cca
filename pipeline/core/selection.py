"""Candidate selection (RAG4DMC, Key Design 3): score the n generated candidates, keep the best.

    s_T(c) = l1 * cos(E_T(c), z_hat_T) + l2 * BLEU(c, retrieved example text) [+ l3 * sim_fuse(c)]
    s_I(c) = l1 * cos(E_I(c), z_hat_I) - l2 * NIQE(c)                         [+ l3 * sim_fuse(c)]

The bracketed term applies to retrieved candidates (the nearest-neighbour generators, whose candidates are
knowledge-base entries): their fused retrieval score is evidence the paper's formula drops, and the
calibration at KB build (``rag4dmc.pipeline.kb.calibrate``) weighs it; 0 by default.

BLEU is sacrebleu's sentence BLEU scaled to [0, 1]; NIQE comes from the scorer model in ``rag4dmc.actors.niqe``,
multiplied by ``niqe_scale`` so both terms share a range. Pure functions: no model is loaded here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from rag4dmc.pipeline.config import SelectionConfig
from rag4dmc.pipeline.core.knn import check_matrix

log = logging.getLogger(__name__)



def sentence_bleu(candidate: str, reference: str) -> float:
    """sacrebleu sentence BLEU-4 (exp smoothing) of ``candidate`` against one reference, in [0, 1]."""
    import sacrebleu

    if not candidate.strip() or not reference.strip():
        return 0.0
    return sacrebleu.sentence_bleu(candidate, [reference]).score / 100.0


def text_score(cos: np.ndarray, bleu: np.ndarray, cfg: SelectionConfig, fused: np.ndarray | None = None) -> np.ndarray:
    """s_T = l1 * cos(E_T(c), z_hat_T) + l2 * BLEU(c) + l3 * sim_fuse(c) (the last only for retrieved candidates).

    Shapes broadcast, so the calibration scores a whole grid at once with the formula the job uses."""
    score = cfg.lambda_cos * np.asarray(cos, np.float32) + cfg.lambda_quality * np.asarray(bleu, np.float32)
    if fused is not None and cfg.lambda_retrieval:
        score = score + cfg.lambda_retrieval * np.asarray(fused, np.float32)
    return np.asarray(score, np.float32)


def image_score(cos: np.ndarray, niqe: np.ndarray, cfg: SelectionConfig, fused: np.ndarray | None = None) -> np.ndarray:
    """s_I = l1 * cos(E_I(c), z_hat_I) - l2 * niqe_scale * NIQE(c) + l3 * sim_fuse(c) (lower NIQE is better).

    A NaN NIQE (undefined for that image, see ``rag4dmc.actors.niqe.niqe_defined``) adds no quality term."""
    niqe = np.nan_to_num(np.asarray(niqe, np.float32), nan=0.0)
    score = cfg.lambda_cos * np.asarray(cos, np.float32) - cfg.lambda_quality * cfg.niqe_scale * niqe
    if fused is not None and cfg.lambda_retrieval:
        score = score + cfg.lambda_retrieval * np.asarray(fused, np.float32)
    return np.asarray(score, np.float32)


def candidate_cosines(cand_emb: np.ndarray, pseudo: np.ndarray) -> np.ndarray:
    """cos(E(c), z_hat) for each candidate embedding row."""
    c = check_matrix(cand_emb, "candidate embeddings")
    p = np.asarray(pseudo, dtype=np.float32).reshape(-1)
    if c.shape[1] != p.shape[0]:
        raise ValueError(f"candidate embeddings have {c.shape[1]} dims, the pseudo-embedding {p.shape[0]}")
    c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    return c @ (p / max(float(np.linalg.norm(p)), 1e-12))


def select_text(candidates: Sequence[str], cos: np.ndarray, cfg: SelectionConfig, *, reference: str | None = None,
                fused: np.ndarray | None = None) -> np.ndarray:
    """Selection scores of one query's text candidates (the job's actors, Serve and evaluation call this).

    BLEU is against ``reference`` (the retrieved example a generator was grounded in) or, with no reference
    (nearest-neighbour candidates, which are the examples themselves), each candidate's agreement with the
    others (:func:`consensus_bleu`). ``fused``: the retrieval's score of each candidate, for retrieved ones."""
    if cfg.lambda_quality == 0:
        bleu = np.zeros(len(candidates), np.float32)
    elif reference is None:
        bleu = consensus_bleu(candidates)
    else:
        bleu = np.array([sentence_bleu(c, reference) for c in candidates], dtype=np.float32)
    return text_score(cos, bleu, cfg, fused)


def select_image(cos: np.ndarray, niqe: np.ndarray | None, cfg: SelectionConfig,
                 fused: np.ndarray | None = None) -> np.ndarray:
    """Selection scores of one query's image candidates; ``niqe`` None: no quality term (image_quality none)."""
    return image_score(cos, np.zeros(len(cos), np.float32) if niqe is None else niqe, cfg, fused)


def wants_niqe(cfg: SelectionConfig) -> bool:
    """Whether image candidates are scored with NIQE under ``cfg``."""
    return cfg.image_quality == "niqe" and cfg.lambda_quality > 0


def consensus_bleu(candidates: Sequence[str]) -> np.ndarray:
    """BLEU of each candidate against the other candidates as references: agreement among neighbours."""
    import sacrebleu

    out = np.zeros(len(candidates), dtype=np.float32)
    for i, c in enumerate(candidates):
        refs = [r for j, r in enumerate(candidates) if j != i and r.strip()]
        if refs and c.strip():
            out[i] = sacrebleu.sentence_bleu(c, refs).score / 100.0
    return out
