"""Planted-structure data for the math tests: what a correct implementation must recover."""

from __future__ import annotations

import numpy as np
from scipy.stats import ortho_group


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(rng: np.random.Generator, centers: np.ndarray, n: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """n unit vectors around the given centres; returns (vectors, cluster label of each)."""
    labels = rng.integers(0, len(centers), n)
    return unit(centers[labels] + noise * rng.normal(size=(n, centers.shape[1]))), labels


def rotation(d: int, seed: int) -> np.ndarray:
    return ortho_group.rvs(d, random_state=seed).astype(np.float32)
