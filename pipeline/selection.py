"""Candidate selection (RAG4DMC, Key Design 3): score the n generated candidates, keep the best.

    s_T(c) = l1 * cos(E_T(c), z_hat_T) + l2 * BLEU(c, retrieved example text)
    s_I(c) = l1 * cos(E_I(c), z_hat_I) - l2 * NIQE(c)

BLEU is sacrebleu's sentence BLEU scaled to [0, 1]; NIQE is pyiqa's, with its parameters read from a
local file (pyiqa would otherwise download them), multiplied by ``niqe_scale`` so both terms share a range.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.knn import check_matrix

# NIQE's natural-scene statistics are fitted on 96 x 96 patches (pyiqa/basicsr); smaller images have none.
NIQE_MIN_SIDE = 96


def sentence_bleu(candidate: str, reference: str) -> float:
    """sacrebleu sentence BLEU-4 (exp smoothing) of ``candidate`` against one reference, in [0, 1]."""
    import sacrebleu

    if not candidate.strip() or not reference.strip():
        return 0.0
    return sacrebleu.sentence_bleu(candidate, [reference]).score / 100.0


def text_score(cos: np.ndarray, bleu: np.ndarray, lambda_cos: float, lambda_quality: float) -> np.ndarray:
    """s_T = l1 * cos(E_T(c), z_hat_T) + l2 * BLEU(c, example)."""
    return (lambda_cos * np.asarray(cos, np.float32) + lambda_quality * np.asarray(bleu, np.float32)).astype(np.float32)


def image_score(cos: np.ndarray, niqe: np.ndarray, lambda_cos: float, lambda_quality: float,
                niqe_scale: float) -> np.ndarray:
    """s_I = l1 * cos(E_I(c), z_hat_I) - l2 * niqe_scale * NIQE(c) (lower NIQE is better).

    A NaN NIQE (undefined: the image is smaller than NIQE's patches) adds no quality term."""
    cos, niqe = np.asarray(cos, np.float32), np.nan_to_num(np.asarray(niqe, np.float32), nan=0.0)
    return (lambda_cos * cos - lambda_quality * niqe_scale * niqe).astype(np.float32)


def candidate_cosines(cand_emb: np.ndarray, pseudo: np.ndarray) -> np.ndarray:
    """cos(E(c), z_hat) for each candidate embedding row."""
    return _cosines(cand_emb, pseudo)


def _cosines(cand_emb: np.ndarray, pseudo: np.ndarray) -> np.ndarray:
    c = check_matrix(cand_emb, "candidate embeddings")
    p = np.asarray(pseudo, dtype=np.float32).reshape(-1)
    if c.shape[1] != p.shape[0]:
        raise ValueError(f"candidate embeddings have {c.shape[1]} dims, the pseudo-embedding {p.shape[0]}")
    c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    return c @ (p / max(float(np.linalg.norm(p)), 1e-12))


def text_scores(
    cand_emb: np.ndarray, pseudo_text: np.ndarray, candidates: Sequence[str], example_text: str,
    lambda_cos: float = 1.0, lambda_quality: float = 0.1,
) -> np.ndarray:
    """s_T = l1 * cos(E_T(c), z_hat_T) + l2 * BLEU(c, example) for each candidate c."""
    bleu = np.array([sentence_bleu(c, example_text) for c in candidates], dtype=np.float32)
    return text_score(_cosines(cand_emb, pseudo_text), bleu, lambda_cos, lambda_quality)


def image_scores(
    cand_emb: np.ndarray, pseudo_image: np.ndarray, niqe: np.ndarray,
    lambda_cos: float = 1.0, lambda_quality: float = 0.1, niqe_scale: float = 0.1,
) -> np.ndarray:
    """s_I = l1 * cos(E_I(c), z_hat_I) - l2 * niqe_scale * NIQE(c) for each candidate c (lower NIQE is better)."""
    return image_score(_cosines(cand_emb, pseudo_image), niqe, lambda_cos, lambda_quality, niqe_scale)


class NiqeParamsMissing(FileNotFoundError):
    """The NIQE parameter file is not where the configuration says."""


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


class NiqeScorer:
    """NIQE of PIL images through pyiqa, with parameters read from a local file (no download)."""

    def __init__(self, params_path: str | None, device: str = "cpu"):
        self.check_params(params_path)
        import pyiqa

        self.metric = pyiqa.create_metric(
            "niqe", device=device, as_loss=False, pretrained_model_path=_mat_file(str(params_path))
        )

    @staticmethod
    def check_params(params_path: str | None) -> None:
        """Raise NiqeParamsMissing, saying what to do, unless the parameter file exists."""
        if not params_path or not Path(params_path).is_file():
            raise NiqeParamsMissing(
                f"NIQE parameters not found at {params_path!r}; set selection.niqe_params (--niqe-params) to "
                "niqe_pris_params.npz from the basicsr 1.4.2 sdist (README: 'Image quality'), or set "
                "selection.image_quality to none (--image-quality none) to rank images by cosine only"
            )

    def __call__(self, images: Sequence) -> np.ndarray:
        """NIQE per image (lower is more natural); NaN for an image smaller than NIQE_MIN_SIDE."""
        import torch

        if not images:
            return np.zeros(0, dtype=np.float32)
        out = []
        for img in images:  # NIQE is defined per image size; no batching across sizes
            if min(img.size) < NIQE_MIN_SIDE:
                out.append(float("nan"))  # undefined, not "perfect": image_score leaves it out
                continue
            x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
            with torch.inference_mode():
                out.append(float(self.metric(x).reshape(-1)[0]))
        return np.asarray(out, dtype=np.float32)


def consensus_bleu(candidates: Sequence[str]) -> np.ndarray:
    """BLEU of each candidate against the other candidates as references: agreement among neighbours."""
    import sacrebleu

    out = np.zeros(len(candidates), dtype=np.float32)
    for i, c in enumerate(candidates):
        refs = [r for j, r in enumerate(candidates) if j != i and r.strip()]
        if refs and c.strip():
            out[i] = sacrebleu.sentence_bleu(c, refs).score / 100.0
    return out
