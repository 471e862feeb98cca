"""A knowledge base from input already in memory (the evaluation, tests): ``rag4dmc kb build``'s out-of-core build
(``rag4dmc.pipeline.kb.build``) run in this process on that input.

The entries and their embeddings are written as the build's input (the clip-retrieval layout, float32; image
bytes to a parquet file that the entries point into by shard and row), built step by step in this process
(``build.InProcess``), and loaded back: the same fit, purification, index, entries schema (by reference, never
image bytes) and manifest as a KB built on a cluster.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
import weakref

import numpy as np
import pyarrow as pa

from rag4dmc.pipeline.config import ColumnsConfig, KBConfig
from rag4dmc.pipeline.core.knn import EmbeddingError, normalize_rows
from rag4dmc.pipeline.core.retrieval import MODALITIES
from rag4dmc.pipeline.io import embedding_layout as layout
from rag4dmc.pipeline.io.datasets import write_parquet
from rag4dmc.pipeline.io.storage import url_to_fs
from rag4dmc.pipeline.kb import store as kb_store
from rag4dmc.pipeline.kb.build import BuildInputs, InProcess, build
from rag4dmc.pipeline.kb.build_sides import EXTERNAL, INTERNAL
from rag4dmc.pipeline.kb.knowledge_base import KnowledgeBase

INPUT_DIR = "input"  # in the KB's folder: the layout the build read, and the images its entries point into
IMAGE_ROW_GROUP = 64  # rows per row group of the images file: fetching one image reads one group


def build_knowledge_base(
    internal_entries: pa.Table,
    internal: dict[str, np.ndarray],
    external_entries: pa.Table | None = None,
    external: dict[str, np.ndarray] | None = None,
    cfg: KBConfig = KBConfig(),
    encoder_info: dict | None = None,
    out: str | None = None,
    storage_options: dict | None = None,
) -> KnowledgeBase:
    """Train the mapping on internal pairs, purify the external part, index everything, save and load the KB.

    ``*_entries`` hold id and text per row, and the image as bytes (``image``) or where it is (``image_uri``, or
    ``image_shard`` + ``image_row``) when they have one; ``internal`` / ``external`` map "image" and "text" to
    row-aligned embeddings of those rows. ``out``: the KB's folder or prefix (default: a temporary folder, removed
    when the returned KB is garbage-collected).
    """
    internal = {m: normalize_rows(internal[m], f"internal {m} embeddings") for m in MODALITIES}
    temporary = out is None
    root = tempfile.mkdtemp(prefix="rag4dmc-kb-") if temporary else out.rstrip("/")
    try:
        sides = {INTERNAL: _write_side(f"{root}/{INPUT_DIR}/{INTERNAL}", internal_entries, internal,
                                       storage_options)}
        if external_entries is not None and external_entries.num_rows:
            external = {m: normalize_rows(external[m], f"external {m} embeddings") for m in MODALITIES}
            sides[EXTERNAL] = _write_side(f"{root}/{INPUT_DIR}/{EXTERNAL}", external_entries, external,
                                          storage_options)
        dims = (internal["image"].shape[1], internal["text"].shape[1])
        build(BuildInputs(internal=sides[INTERNAL], external=sides.get(EXTERNAL), out=root, dims=dims,
                          encoder_info=encoder_info or {}, storage_options=storage_options,
                          columns=ColumnsConfig().model_dump()), cfg, InProcess())
        kb = kb_store.load(root, storage_options)
    except BaseException:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
        raise
    if temporary:
        weakref.finalize(kb, shutil.rmtree, root, True)
    return kb


def _write_side(root: str, entries: pa.Table, vectors: dict[str, np.ndarray], storage_options: dict | None) -> str:
    """One side as a one-shard layout at ``root`` (float32: nothing lost before the build's own float16 parts),
    with its image bytes, if any, in ``root/images-<id>.parquet``; returns ``root``."""
    if not entries.num_rows == len(vectors["image"]) == len(vectors["text"]):
        raise EmbeddingError(f"{root.rsplit('/', 1)[-1]} entries ({entries.num_rows} rows), image and text embeddings "
                             f"({len(vectors['image'])}, {len(vectors['text'])}) must have the same number of rows")
    meta = {"id": entries.column("id").cast(pa.string()), "caption": entries.column("text").cast(pa.string())}
    if "image_uri" in entries.column_names:
        meta["image_uri"] = entries.column("image_uri").cast(pa.string())
    if "image_shard" in entries.column_names:
        meta["image_shard"] = entries.column("image_shard").cast(pa.string())
        meta["image_row"] = entries.column("image_row").cast(pa.int64())
    elif "image" in entries.column_names:
        # a name of its own per build: image caches key on where an image is, and ``out`` may be built again
        images = f"{root}/images-{uuid.uuid4().hex[:12]}.parquet"
        fs, path = url_to_fs(root, storage_options)
        for earlier in fs.glob(f"{path}/images-*.parquet"):  # an earlier build's, which nothing points into now
            fs.rm(earlier)
        write_parquet(pa.table({ColumnsConfig().image: entries.column("image").cast(pa.binary())}), images,
                      storage_options, row_group_size=IMAGE_ROW_GROUP)
        present = entries.column("image").is_valid().to_pylist()
        meta["image_shard"] = pa.array([images if ok else None for ok in present], pa.string())
        meta["image_row"] = pa.array([i if ok else None for i, ok in enumerate(present)], pa.int64())
    layout.write_embedding_shard(root, "0", vectors["image"], vectors["text"], pa.table(meta), storage_options,
                                 dtype="float32")
    return root
