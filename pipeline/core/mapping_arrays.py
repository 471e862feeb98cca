"""The trained mapping applied with numpy: pseudo-embeddings z_hat at query time, without torch (RAG4DMC, Key Design 1).

Training stays in ``rag4dmc.pipeline.core.mapping`` (torch); what queries need is the forward pass of that MLP,
which numpy does as exactly (float32, GELU by erf) in a process that never imports torch: a retrieval actor starts
in about 2 s less and peaks about 500 MB lower (README, "Queries without torch"). The weights file is safetensors: the
layer tensors under ``CrossModalMapper``'s state-dict names, its architecture in the metadata (``ARCH_KEY``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from rag4dmc.pipeline.core.knn import EmbeddingError, check_matrix

ARCH_KEY = "rag4dmc.mapping.arch"  # safetensors metadata: image_dim, text_dim, hidden_dim, num_layers (JSON)
ROWS_PER_BLOCK = 4096  # query rows per forward pass: bounded temporaries (hidden_dim floats per row)


def check_query(z: np.ndarray, want: int, what: str) -> np.ndarray:
    """``z`` as float32 [n, want] (the mapping's input for ``what`` embeddings), or an EmbeddingError saying why not."""
    x = check_matrix(z, f"{what} embeddings")
    if x.shape[1] != want:
        raise EmbeddingError(f"the mapping expects {want}-d {what} embeddings, got {x.shape[1]}-d")
    return x


def unit_rows(y: np.ndarray) -> np.ndarray:
    """The mapped rows scaled to unit length: pseudo-embeddings are compared by cosine."""
    return y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)


def gelu(x: np.ndarray) -> np.ndarray:
    """GELU(x) = x / 2 * (1 + erf(x / sqrt 2)), the exact form of torch.nn.GELU()."""
    from scipy.special import erf

    return 0.5 * x * (1.0 + erf(x * np.float32(1 / math.sqrt(2))))


class MappingArrays:
    """f_I->T and f_T->I of a trained ``CrossModalMapper`` as arrays; the same methods, unit vectors out."""

    def __init__(self, arch: dict, weights: dict[str, np.ndarray]):
        self.image_dim, self.text_dim = int(arch["image_dim"]), int(arch["text_dim"])
        self.hidden_dim, self.num_layers = int(arch["hidden_dim"]), int(arch["num_layers"])
        w = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()}
        self.weights = w  # the layers below are views of these: one copy of the weights in memory

        def layer(name: str) -> tuple[np.ndarray, np.ndarray]:
            return w[f"{name}.weight"].T, w[f"{name}.bias"]

        self.in_image, self.in_text = layer("in_image"), layer("in_text")
        # the torch trunk is [GELU, Linear, GELU, Linear, GELU, ...]: its Linear layers sit at the odd positions
        self.trunk = [layer(f"trunk.{2 * i + 1}") for i in range(self.num_layers - 1)]
        self.to_text, self.to_image = layer("to_text"), layer("to_image")

    def image_to_text(self, z_image: np.ndarray) -> np.ndarray:
        """Pseudo text embeddings z_hat_T = f_I->T(z_I), unit-normalised."""
        return self._apply(z_image, self.image_dim, "image", self.in_image, self.to_text)

    def text_to_image(self, z_text: np.ndarray) -> np.ndarray:
        """Pseudo image embeddings z_hat_I = f_T->I(z_T), unit-normalised."""
        return self._apply(z_text, self.text_dim, "text", self.in_text, self.to_image)

    def _apply(self, z: np.ndarray, want: int, what: str, first, last) -> np.ndarray:
        x = check_query(z, want, what)
        out = []
        for s in range(0, len(x), ROWS_PER_BLOCK):
            h = gelu(x[s : s + ROWS_PER_BLOCK] @ first[0] + first[1])
            for w, b in self.trunk:
                h = gelu(h @ w + b)
            out.append(h @ last[0] + last[1])
        return unit_rows(np.concatenate(out))

    def arch(self) -> dict:
        return {"image_dim": self.image_dim, "text_dim": self.text_dim, "hidden_dim": self.hidden_dim,
                "num_layers": self.num_layers}

    def save(self, path: str | Path) -> None:
        """Write the weights file (what ``CrossModalMapper.save`` writes for the same weights)."""
        save_weights(path, self.arch(), self.weights)

    @classmethod
    def load(cls, path: str | Path) -> MappingArrays:
        """Read a weights file written by ``save`` or ``CrossModalMapper.save``."""
        arch, weights = load_weights(path)
        return cls(arch, weights)


def save_weights(path: str | Path, arch: dict, weights: dict[str, np.ndarray]) -> None:
    """The mapping's tensors and architecture as one safetensors file."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()}, str(path),
              metadata={ARCH_KEY: json.dumps(arch, sort_keys=True)})


def load_weights(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(architecture, tensors by state-dict name) of a mapping weights file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        meta = f.metadata() or {}
        if ARCH_KEY not in meta:
            raise ValueError(f"{path} is not a rag4dmc mapping weights file (no {ARCH_KEY} in its metadata)")
        return json.loads(meta[ARCH_KEY]), {k: f.get_tensor(k) for k in f.keys()}
