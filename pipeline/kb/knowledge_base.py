"""The purified dual knowledge base as one object: its entries, mapping and shards; query it.

Built by ``rag4dmc kb build`` (``rag4dmc.pipeline.kb.build``; from input already in memory, by the same build run
in this process: ``rag4dmc.pipeline.kb.in_memory``) and loaded by ``rag4dmc.pipeline.kb.store``. Its entries say
where each image is, never hold its bytes: :meth:`KnowledgeBase.images` fetches them. A KB's shards hold both modalities of the same row range, so a retrieval actor that
holds one shard computes both fusion terms (intra and cross) of its own candidates; shards merge by the
intra score (stage 1), and the fused rerank (stage 2) runs on the merged candidates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from rag4dmc.pipeline.config import RetrievalConfig
from rag4dmc.pipeline.core.retrieval import Neighbours, Shard, search

if TYPE_CHECKING:  # a stored KB's mapping is MappingArrays: loading one never imports torch
    from rag4dmc.pipeline.core.mapping import CrossModalMapper
    from rag4dmc.pipeline.core.mapping_arrays import MappingArrays
    from rag4dmc.pipeline.io.kb_images import ExampleImages

log = logging.getLogger(__name__)



@dataclass
class KnowledgeBase:
    entries: pa.Table  # store.ENTRY_SCHEMA: id, source, text and where the image is
    mapping: CrossModalMapper | MappingArrays  # trained in this process, or loaded from a stored KB
    shards: list[Shard]
    report: dict
    manifest: dict = field(default_factory=dict)
    storage_options: dict | None = None  # where the entries' images are read from
    _images: ExampleImages | None = field(default=None, init=False, repr=False)  # made on first use

    @property
    def version(self) -> str:
        return self.manifest["version"]

    def __len__(self) -> int:
        return self.entries.num_rows

    def images(self, rows) -> list[bytes | None]:
        """The images of entries ``rows``, fetched by reference (None where an entry has none, or it cannot be
        read)."""
        if self._images is None:
            from rag4dmc.pipeline.config import ColumnsConfig
            from rag4dmc.pipeline.io.kb_images import ExampleImages

            self._images = ExampleImages(self.storage_options,
                                         columns=ColumnsConfig(**self.manifest.get("input_columns", {})))
        picked = self.entries.select(["image_uri", "image_shard", "image_row"]).take(
            pa.array(np.asarray(rows, np.int64))).to_pylist()
        return [self._images.get(e["image_uri"], e["image_shard"], e["image_row"])[0] for e in picked]

    def pseudo(self, query: np.ndarray, observed: str) -> np.ndarray:
        """z_hat of the missing modality from the observed one (the mapping MLP)."""
        return self.mapping.image_to_text(query) if observed == "image" else self.mapping.text_to_image(query)

    def retrieve(self, query: np.ndarray, observed: str, cfg: RetrievalConfig = RetrievalConfig()) -> Neighbours:
        """Two-stage fusion retrieval of each query row against every shard, merged."""
        return search(self.shards, query, self.pseudo(query, observed), observed, cfg)
