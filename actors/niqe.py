"""NIQE, the no-reference image quality of candidate selection (RAG4DMC, Key Design 3): pyiqa's model, with
its parameters read from a local file (``rag4dmc setup`` installs basicsr's; pyiqa would otherwise download them).
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

from rag4dmc.actors.images import to_rgb
from rag4dmc.pipeline.setup_data import niqe_params_path

log = logging.getLogger(__name__)

# NIQE's natural-scene statistics are fitted on 96 x 96 patches (pyiqa/basicsr); smaller images have none.
NIQE_MIN_SIDE = 96
# A patch whose grey levels vary less than this (std, on [0, 1]; under 1/255) has no texture for NIQE's fit.
NIQE_FLAT_STD = 1.0 / 255.0
# An image none of whose patches has texture gives NIQE's fit nothing: pyiqa's covariance SVD fails on it.
NIQE_MIN_TEXTURED_PATCHES = 1


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
