"""The query-embedding stage: one encoder per actor, loaded once, applied to the rows that need it."""

from __future__ import annotations

import time

import numpy as np

from actors.encoders import create_encoder, encoder_class
from actors.resources import Resources
from pipeline.config import EncoderConfig
from pipeline.schema import TASK_I2T, TASK_OBSERVED, TASK_T2I, numpy_stage


class EmbedQueries:
    """Embeds the observed modality of i2t rows (``pixels``) or t2i rows (``text``) into ``query``."""

    def __init__(self, encoder: EncoderConfig, modality: str):
        if modality not in ("image", "text"):
            raise ValueError(f"modality must be image or text, got {modality!r}")
        self.modality = modality
        self.encoder = create_encoder(encoder)
        self.dim = self.encoder.image_dim if modality == "image" else self.encoder.text_dim

    @staticmethod
    def resources(encoder: EncoderConfig) -> Resources:
        return encoder_class(encoder).RESOURCES

    @numpy_stage
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        n = len(batch["row_key"])
        want = TASK_I2T if self.modality == "image" else TASK_T2I
        rows = np.flatnonzero(np.asarray(batch["task"], dtype=object) == want)
        query = np.zeros((n, self.dim), dtype=np.float32)
        if rows.size:
            if self.modality == "image":
                query[rows] = self.encoder.encode_pixels(np.asarray(batch["pixels"])[rows])
            else:
                query[rows] = self.encoder.encode_texts([batch["text"][i] for i in rows])
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out["query"] = query
        seconds = np.array(batch.get("seconds_embed", np.zeros(n)), dtype=np.float32)
        seconds[rows] += (time.perf_counter() - t0) / max(rows.size, 1)
        out["seconds_embed"] = seconds
        return out


class EmbedPairs:
    """Embeds both modalities of complete pairs (knowledge-base building): ``image_emb`` and ``text_emb``."""

    def __init__(self, encoder: EncoderConfig):
        self.encoder = create_encoder(encoder)

    @numpy_stage
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["row_key"])
        ok = np.flatnonzero(np.asarray(batch["task"], dtype=object) == TASK_OBSERVED)
        image_emb = np.zeros((n, self.encoder.image_dim), np.float32)
        text_emb = np.zeros((n, self.encoder.text_dim), np.float32)
        if ok.size:
            image_emb[ok] = self.encoder.encode_pixels(np.asarray(batch["pixels"])[ok])
            text_emb[ok] = self.encoder.encode_texts([batch["text"][i] for i in ok])
        out = {k: v for k, v in batch.items() if k != "pixels"}
        return {**out, "image_emb": image_emb, "text_emb": text_emb}
