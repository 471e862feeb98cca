"""The embedding stages: one encoder per actor, loaded once in ``setup``, applied to the rows that need it."""

from __future__ import annotations

import numpy as np

from rag4dmc.actors.encoders import describe_encoder
from rag4dmc.actors.factory import create_encoder, encoder_class
from rag4dmc.actors.stage import Column, Produced, Stage
from rag4dmc.pipeline.config import EncoderConfig
from rag4dmc.pipeline.schema import TASK_I2T, TASK_OBSERVED, TASK_T2I


class EmbedQueries(Stage):
    """Embeds the observed modality of i2t rows (``pixels``) or t2i rows (``text``) into ``query``."""

    name, accounts = "embed", "embed"

    def __init__(self, encoder: EncoderConfig, modality: str):
        if modality not in ("image", "text"):
            raise ValueError(f"modality must be image or text, got {modality!r}")
        self.cfg, self.modality = encoder, modality
        dim = describe_encoder(encoder)["image_dim" if modality == "image" else "text_dim"]
        self.tasks = (TASK_I2T,) if modality == "image" else (TASK_T2I,)
        self.reads = ("pixels",) if modality == "image" else ("text",)
        self.writes = (Column("query", 0.0, np.float32, (dim,)),)
        self.drops = ("pixels",) if modality == "image" else ()
        self.RESOURCES = encoder_class(encoder).RESOURCES

    def setup(self) -> None:
        self.encoder = create_encoder(self.cfg, towers=(self.modality,))

    def process(self, rows):
        if self.modality == "image":
            return Produced({"query": self.encoder.encode_pixels(np.asarray(rows["pixels"]))})
        return Produced({"query": self.encoder.encode_texts(list(rows["text"]))})


class EmbedPairs(Stage):
    """Embeds both modalities of complete pairs (knowledge-base building): ``image_emb`` and ``text_emb``."""

    name, accounts = "embed_pairs", None
    tasks = (TASK_OBSERVED,)
    reads = ("pixels", "text")
    drops = ("pixels",)

    def __init__(self, encoder: EncoderConfig):
        self.cfg = encoder
        dims = describe_encoder(encoder)
        self.writes = (Column("image_emb", 0.0, np.float32, (dims["image_dim"],)),
                       Column("text_emb", 0.0, np.float32, (dims["text_dim"],)))
        self.RESOURCES = encoder_class(encoder).RESOURCES

    def setup(self) -> None:
        self.encoder = create_encoder(self.cfg)

    def process(self, rows):
        return Produced({"image_emb": self.encoder.encode_pixels(np.asarray(rows["pixels"])),
                         "text_emb": self.encoder.encode_texts(list(rows["text"]))})
