"""Cross-modal bidirectional mapping (RAG4DMC, Key Design 1).

Two maps, f_I->T and f_T->I, trained only on internal complete pairs with

    L_map = mean(||f_I->T(z_I) - z_T||^2 + ||f_T->I(z_T) - z_I||^2).

Where the two embedding sizes are equal (a CLIP-like shared space) the input projection and hidden
trunk are shared by both directions; where they differ (separate image and text encoders) each
modality has its own input projection. Each direction has its own output head. The mapped vectors
are the pseudo-embeddings z_hat that fusion retrieval and candidate selection compare against.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rag4dmc.pipeline.config import MappingConfig
from rag4dmc.pipeline.core.knn import EmbeddingError, normalize_rows
from rag4dmc.pipeline.core.mapping_arrays import (
    ROWS_PER_BLOCK,
    check_query,
    load_weights,
    save_weights,
    unit_rows,
)

log = logging.getLogger(__name__)

MIN_TRAIN_PAIRS = 4


class CrossModalMapper(nn.Module):
    """f_I->T and f_T->I as one module; ``image_to_text`` / ``text_to_image`` return unit vectors."""

    def __init__(self, image_dim: int, text_dim: int, hidden_dim: int = 1024, num_layers: int = 2):
        super().__init__()
        self.image_dim, self.text_dim = image_dim, text_dim
        self.hidden_dim, self.num_layers = hidden_dim, num_layers
        self.shared = image_dim == text_dim
        self.in_image = nn.Linear(image_dim, hidden_dim)
        self.in_text = self.in_image if self.shared else nn.Linear(text_dim, hidden_dim)
        trunk: list[nn.Module] = [nn.GELU()]
        for _ in range(num_layers - 1):
            trunk += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
        self.trunk = nn.Sequential(*trunk)
        self.to_text = nn.Linear(hidden_dim, text_dim)
        self.to_image = nn.Linear(hidden_dim, image_dim)

    def forward(self, z_image: torch.Tensor, z_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f_I->T(z_I), f_T->I(z_T))."""
        return self.to_text(self.trunk(self.in_image(z_image))), self.to_image(self.trunk(self.in_text(z_text)))

    @torch.inference_mode()
    def image_to_text(self, z_image: np.ndarray, batch_size: int = ROWS_PER_BLOCK) -> np.ndarray:
        """Pseudo text embeddings z_hat_T = f_I->T(z_I), unit-normalised."""
        x = check_query(z_image, self.image_dim, "image")
        return self._apply(lambda t: self.to_text(self.trunk(self.in_image(t))), x, batch_size)

    @torch.inference_mode()
    def text_to_image(self, z_text: np.ndarray, batch_size: int = ROWS_PER_BLOCK) -> np.ndarray:
        """Pseudo image embeddings z_hat_I = f_T->I(z_T), unit-normalised."""
        x = check_query(z_text, self.text_dim, "text")
        return self._apply(lambda t: self.to_image(self.trunk(self.in_text(t))), x, batch_size)

    def _apply(self, fn, x: np.ndarray, batch_size: int) -> np.ndarray:
        self.eval()
        out = [fn(torch.from_numpy(x[s : s + batch_size])).numpy() for s in range(0, len(x), batch_size)]
        return unit_rows(np.concatenate(out) if out else np.zeros((0, self.to_text.out_features), np.float32))

    def arch(self) -> dict:
        return {"image_dim": self.image_dim, "text_dim": self.text_dim,
                "hidden_dim": self.hidden_dim, "num_layers": self.num_layers}

    def arrays(self) -> dict[str, np.ndarray]:
        """The weights as numpy arrays, by state-dict name."""
        return {k: v.detach().cpu().numpy() for k, v in self.state_dict().items()}

    @classmethod
    def from_arrays(cls, arch: dict, arrays: dict[str, np.ndarray]) -> CrossModalMapper:
        """The mapping of :meth:`arch` and :meth:`arrays` (data only: nothing is unpickled)."""
        model = cls(**arch)
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()})  # a writable copy
        return model.eval()

    def save(self, path: str | Path) -> None:
        """Write weights and architecture to one safetensors file, which ``MappingArrays`` reads without torch."""
        save_weights(path, self.arch(), self.arrays())

    @classmethod
    def load(cls, path: str | Path) -> CrossModalMapper:
        """Read a mapping written by save(), or the torch file of a format-3 knowledge base (``mapping.pt``)."""
        if Path(path).suffix == ".pt":
            blob = torch.load(path, map_location="cpu", weights_only=True)
            return cls.from_arrays(blob["arch"], {k: v.numpy() for k, v in blob["state_dict"].items()})
        return cls.from_arrays(*load_weights(path))


@dataclass
class MappingReport:
    epochs: int
    best_epoch: int
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    n_train: int = 0
    n_val: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def mapping_loss(model: CrossModalMapper, z_image: torch.Tensor, z_text: torch.Tensor) -> torch.Tensor:
    """L_map = mean(||f_I->T(z_I) - z_T||^2 + ||f_T->I(z_T) - z_I||^2)."""
    to_text, to_image = model(z_image, z_text)
    return ((to_text - z_text).pow(2).sum(1) + (to_image - z_image).pow(2).sum(1)).mean()


def train_mapping(
    z_image: np.ndarray, z_text: np.ndarray, cfg: MappingConfig = MappingConfig()
) -> tuple[CrossModalMapper, MappingReport]:
    """Fit the bidirectional mapping on paired internal embeddings, early-stopped on a held-out split."""
    zi = normalize_rows(z_image, "image embeddings")
    zt = normalize_rows(z_text, "text embeddings")
    if len(zi) != len(zt):
        raise EmbeddingError(f"need paired rows: {len(zi)} image vs {len(zt)} text embeddings")
    if len(zi) < MIN_TRAIN_PAIRS:
        raise EmbeddingError(f"need at least {MIN_TRAIN_PAIRS} internal pairs to train the mapping, got {len(zi)}")

    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    perm = torch.randperm(len(zi), generator=gen).numpy()
    n_val = max(1, int(round(cfg.val_fraction * len(zi))))
    val, train = perm[:n_val], perm[n_val:]
    ti, tt = torch.from_numpy(zi[train]), torch.from_numpy(zt[train])
    vi, vt = torch.from_numpy(zi[val]), torch.from_numpy(zt[val])

    model = CrossModalMapper(zi.shape[1], zt.shape[1], cfg.hidden_dim, cfg.num_layers)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    report = MappingReport(epochs=0, best_epoch=0, n_train=len(train), n_val=n_val)
    best_val, best_state, stale = float("inf"), copy.deepcopy(model.state_dict()), 0
    for epoch in range(cfg.max_epochs):
        model.train()
        order = torch.randperm(len(train), generator=gen)
        total = 0.0
        for start in range(0, len(train), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            loss = mapping_loss(model, ti[idx], tt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        model.eval()
        with torch.inference_mode():
            val_loss = float(mapping_loss(model, vi, vt))
        report.train_loss.append(total / len(train))
        report.val_loss.append(val_loss)
        report.epochs = epoch + 1
        if val_loss < best_val - 1e-6:
            best_val, best_state, stale, report.best_epoch = val_loss, copy.deepcopy(model.state_dict()), 0, epoch
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    model.load_state_dict(best_state)
    log.info("mapping: %d epochs, best held-out L_map %.4f at epoch %d", report.epochs, best_val, report.best_epoch)
    return model.eval(), report
