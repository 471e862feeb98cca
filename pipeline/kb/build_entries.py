"""Step 4 of the out-of-core build, entries: the parts' metadata streamed into the KB's one memory-mapped Arrow
entries file (id, source, text and where the image is; never the image bytes).
"""

from __future__ import annotations

import hashlib
import logging

import pyarrow as pa

from rag4dmc.pipeline.io import embedding_layout as layout
from rag4dmc.pipeline.io.storage import url_to_fs
from rag4dmc.pipeline.kb.build_sides import PART_SCHEMA, Side

log = logging.getLogger(__name__)

def write_entries(parts: Side, uri: str, storage_options: dict | None) -> tuple[int, str]:
    """The parts' metadata, in KB row order, as the memory-mapped entries file; one part in memory at a time.
    Returns the rows and the file's sha256."""
    import tempfile
    from pathlib import Path

    from rag4dmc.pipeline.kb.store import ENTRIES_BATCH_ROWS, ENTRY_SCHEMA

    with tempfile.TemporaryDirectory(prefix="rag4dmc-entries-") as tmp:
        path = Path(tmp) / "entries.arrow"
        rows = 0
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, ENTRY_SCHEMA) as writer:
            for shard in parts.shards:
                meta = layout.read_metadata(shard, storage_options, extra=PART_SCHEMA)
                table = pa.table({c: meta[c] for c in ENTRY_SCHEMA.names}).cast(ENTRY_SCHEMA)
                writer.write_table(table, max_chunksize=ENTRIES_BATCH_ROWS)
                rows += table.num_rows
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
        fs, dest = url_to_fs(uri, storage_options)
        fs.put_file(str(path), dest)
    return rows, digest.hexdigest()


def unmark(out: str, storage_options: dict | None) -> None:
    """Remove an earlier KB's manifest at ``out`` before its files are rewritten."""
    fs, path = url_to_fs(f"{out}/manifest.json", storage_options)
    if fs.exists(path):
        log.info("rebuilding the knowledge base at %s", out)
        fs.rm(path)
