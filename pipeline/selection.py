"""Candidate selection (RAG4DMC, Key Design 3): score the n generated candidates, keep the best.

    s_T(c) = l1 * cos(E_T(c), z_hat_T) + l2 * BLEU(c, retrieved example text) [+ l3 * sim_fuse(c)]
    s_I(c) = l1 * cos(E_I(c), z_hat_I) - l2 * NIQE(c)                         [+ l3 * sim_fuse(c)]

The bracketed term applies to retrieved candidates (the nearest-neighbour generators, whose candidates are
knowledge-base entries): their fused retrieval score is evidence the paper's formula drops, and the
calibration at KB build (``pipeline.calibrate``) weighs it; 0 by default.

BLEU is sacrebleu's sentence BLEU scaled to [0, 1]; NIQE is pyiqa's, with its parameters read from a
local file (pyiqa would otherwise download them), multiplied by ``niqe_scale`` so both terms share a range.
"""

from __future__ import annotations

import functools
import logging
import math
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.assets import niqe_params_path
from pipeline.config import SelectionConfig
from pipeline.knn import check_matrix

log = logging.getLogger(__name__)

# NIQE's natural-scene statistics are fitted on 96 x 96 patches (pyiqa/basicsr); smaller images have none.
NIQE_MIN_SIDE = 96
# A patch whose grey levels vary less than this (std, on [0, 1]; under 1/255) has no texture for NIQE's fit.
NIQE_FLAT_STD = 1.0 / 255.0
# An image none of whose patches has texture gives NIQE's fit nothing: pyiqa's covariance SVD fails on it.
NIQE_MIN_TEXTURED_PATCHES = 1


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

    A NaN NIQE (undefined for that image, see :func:`niqe_defined`) adds no quality term."""
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


@functools.lru_cache(maxsize=4)
def _mat_file(params_path: str) -> str:
    """pyiqa reads a .mat with mu_prisparam / cov_prisparam; convert an .npz (basicsr's layout) once."""
    import scipy.io

    if params_path.endswith(".mat"):
        return params_path
    p = np.load(params_path)
    out = Path(tempfile.mkdtemp(prefix="rag4dmc-niqe-")) / "niqe_params.mat"
    scipy.io.savemat(out, {"mu_prisparam": p["mu_pris_param"], "cov_prisparam": p["cov_pris_param"]})
    return str(out)


def niqe_defined(gray: np.ndarray) -> str | None:
    """Why NIQE is undefined for a grey image in [0, 1] (None: it is defined).

    NIQE fits a generalised Gaussian to the locally normalised luminance of every 96-px patch; a flat patch has
    zero local variance and makes the fit (and pyiqa's covariance SVD) non-finite. Images smaller than one
    patch, and images none of whose patches has texture, have no statistic to compare."""
    if min(gray.shape) < NIQE_MIN_SIDE:
        return f"smaller than NIQE's {NIQE_MIN_SIDE}-px patches"
    h, w = (s // NIQE_MIN_SIDE * NIQE_MIN_SIDE for s in gray.shape)
    patches = gray[:h, :w].reshape(h // NIQE_MIN_SIDE, NIQE_MIN_SIDE, w // NIQE_MIN_SIDE, NIQE_MIN_SIDE)
    textured = int((patches.std(axis=(1, 3)) > NIQE_FLAT_STD).sum())
    if textured < NIQE_MIN_TEXTURED_PATCHES:
        return f"{textured} of {patches.shape[0] * patches.shape[2]} patches have texture (flat or near-uniform)"
    return None


class NiqeScorer:
    """NIQE of PIL images through pyiqa, with parameters read from a local file (no download).

    Every image gets a finite score or NaN ("no quality term"), never an exception: images on which NIQE is
    undefined (:func:`niqe_defined`) are not scored, and a failure inside pyiqa (a singular covariance on line
    art, say) or a non-finite result is NaN for that image alone, counted in ``undefined``."""

    def __init__(self, params_path: str | None = None, device: str = "cpu"):
        import pyiqa

        self.params_path = niqe_params_path(params_path)
        self.metric = pyiqa.create_metric(
            "niqe", device=device, as_loss=False, pretrained_model_path=_mat_file(self.params_path)
        )
        self.undefined = 0  # images scored NaN so far

    @staticmethod
    def check_params(params_path: str | None) -> str:
        """The parameter file that would be used; raises NiqeParamsMissing, saying what to do, if there is none."""
        return niqe_params_path(params_path)

    def score(self, img) -> float:
        """NIQE of one PIL image (lower is more natural), or NaN where it is undefined or pyiqa fails."""
        import torch

        from actors.images import to_rgb

        rgb = np.asarray(to_rgb(img), dtype=np.float32) / 255.0  # transparent pixels on white, as the job sees them
        why = niqe_defined(rgb @ np.array([0.299, 0.587, 0.114], np.float32))
        if why is None:
            x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
            try:
                with torch.inference_mode(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # pyiqa warns on one-patch covariances; the value is checked
                    value = float(self.metric(x).reshape(-1)[0])
            except Exception as exc:  # noqa: BLE001 - a quality term must never fail a row
                why = f"pyiqa failed: {type(exc).__name__}: {str(exc)[:200]}"
            else:
                if math.isfinite(value):
                    return value
                why = f"pyiqa returned {value}"
        self.undefined += 1
        log.debug("NIQE undefined for a %dx%d image (%s): no quality term", *img.size, why)
        return float("nan")

    def __call__(self, images: Sequence) -> np.ndarray:
        """NIQE per image (NIQE is defined per image size: no batching across sizes); NaN where undefined."""
        return np.asarray([self.score(img) for img in images], dtype=np.float32)


def consensus_bleu(candidates: Sequence[str]) -> np.ndarray:
    """BLEU of each candidate against the other candidates as references: agreement among neighbours."""
    import sacrebleu

    out = np.zeros(len(candidates), dtype=np.float32)
    for i, c in enumerate(candidates):
        refs = [r for j, r in enumerate(candidates) if j != i and r.strip()]
        if refs and c.strip():
            out[i] = sacrebleu.sentence_bleu(c, refs).score / 100.0
    return out
