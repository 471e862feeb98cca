"""The out-of-core build's inputs as sides: layout shards of one corpus with their global row offsets (internal,
external, and the purified parts the index step reads).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from rag4dmc.pipeline.core.knn import normalize_rows
from rag4dmc.pipeline.io import embedding_layout as layout
from rag4dmc.pipeline.kb.store import PARTS_DIR

INTERNAL, EXTERNAL = "internal", "external"


LOCATION_SCHEMA = pa.schema([("image_shard", pa.string()), ("image_row", pa.int64())])


PART_SCHEMA = pa.schema([("source", pa.string()), *LOCATION_SCHEMA])


@dataclass(frozen=True)
class Side:
    """One side of the KB's input: its layout shards and their global row offsets."""

    name: str
    root: str
    shards: list[layout.EmbeddingShard]

    @property
    def rows(self) -> int:
        return layout.total_rows(self.shards)

    @property
    def offsets(self) -> np.ndarray:
        return layout.shard_offsets(self.shards)

    def read(self, ids: np.ndarray, modality: str, storage_options: dict | None) -> np.ndarray:
        """Unit-norm float32 vectors of these side-global row ids."""
        return normalize_rows(layout.read_rows(self.shards, self.offsets, ids, modality, storage_options),
                              f"{self.name} {modality} embeddings")


def open_side(name: str, root: str, storage_options: dict | None, dims: tuple[int, int] | None = None) -> Side:
    """The layout at ``root``, checked against the encoder's (image, text) dims when they are known."""
    shards = layout.list_embedding_shards(root, storage_options)
    if dims is not None:
        try:
            layout.check_dims(shards, dims[0], dims[1], f"{name} embeddings at {root}")
        except layout.LayoutError as exc:
            raise layout.LayoutError(f"{exc} (the encoder is chosen with --encoder / --model-name, e.g. "
                                     "--encoder open_clip --model-name ViT-L-14 for LAION's 768-d embeddings)") from None
    return Side(name, root, shards)


def purified_parts(out: str, storage_options: dict | None, sides: tuple[Side, ...]) -> list[layout.EmbeddingShard]:
    """The purified parts of these inputs in KB row order: internal ones, then external ones, by shard number."""
    found = []
    for side in sides:
        parts = {p.number: p for p in layout.list_embedding_shards(f"{out}/{PARTS_DIR}/{side.name}", storage_options)}
        missing = [sh.number for sh in side.shards if sh.number not in parts]
        if missing:
            raise RuntimeError(f"the purify pass left no part for {side.name} shards {missing[:5]}: rerun the build")
        found += [parts[sh.number] for sh in side.shards]
    return found
