"""Downstream utility (the paper's yardstick): train an image-text retrieval model on a variant's data.

On CPU the model is a pair of contrastive projection heads over frozen encoder features, trained with
the symmetric InfoNCE loss (CLIP's objective) and AdamW; R@1/R@5 in both directions on the test split
measure how useful the (completed) training data is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rag4dmc.pipeline.core.metrics import recall_at_k


@dataclass(frozen=True)
class HeadConfig:
    dim: int = 128
    epochs: int = 30
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-2
    temperature: float = 0.07
    seed: int = 0


class ProjectionHeads(nn.Module):
    """Linear image and text heads into a shared, unit-normalised space."""

    def __init__(self, image_dim: int, text_dim: int, dim: int):
        super().__init__()
        self.image = nn.Linear(image_dim, dim)
        self.text = nn.Linear(text_dim, dim)

    def forward(self, zi: torch.Tensor, zt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return nn.functional.normalize(self.image(zi), dim=-1), nn.functional.normalize(self.text(zt), dim=-1)


def info_nce(pi: torch.Tensor, pt: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matched pairs (CLIP's contrastive loss)."""
    logits = pi @ pt.T / temperature
    target = torch.arange(len(pi))
    return (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)) / 2


def train_heads(z_image: np.ndarray, z_text: np.ndarray, cfg: HeadConfig = HeadConfig()) -> ProjectionHeads:
    """Fit projection heads on paired training embeddings."""
    if len(z_image) != len(z_text) or len(z_image) < 2:
        raise ValueError(f"need at least 2 paired rows, got {len(z_image)} images and {len(z_text)} texts")
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    zi, zt = torch.from_numpy(np.ascontiguousarray(z_image, np.float32)), torch.from_numpy(
        np.ascontiguousarray(z_text, np.float32))
    model = ProjectionHeads(zi.shape[1], zt.shape[1], cfg.dim)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    for _ in range(cfg.epochs):
        order = torch.randperm(len(zi), generator=gen)
        for s in range(0, len(zi), cfg.batch_size):
            idx = order[s : s + cfg.batch_size]
            if len(idx) < 2:
                continue
            loss = info_nce(*model(zi[idx], zt[idx]), cfg.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


@torch.inference_mode()
def evaluate_heads(model: ProjectionHeads, z_image: np.ndarray, z_text: np.ndarray) -> dict[str, float]:
    """I2T and T2I R@1 / R@5 on paired test embeddings."""
    pi, pt = model(torch.from_numpy(np.asarray(z_image, np.float32)), torch.from_numpy(np.asarray(z_text, np.float32)))
    sim = (pi @ pt.T).numpy()
    i2t, t2i = recall_at_k(sim), recall_at_k(sim.T)
    return {"i2t_r1": i2t[1], "i2t_r5": i2t[5], "t2i_r1": t2i[1], "t2i_r5": t2i[5]}
