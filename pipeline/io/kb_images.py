"""Images of retrieved knowledge-base examples, fetched by reference on first use, with a per-node disk cache.

A KB stores where each entry's image is, never its bytes (``rag4dmc.pipeline.kb.store``): an ``image_uri`` (a URL,
a path or an object-storage URI), or the input data shard and row it came from. A completion actor asks for
an example's image only when its generator uses it (img2img: the best example that decodes; the
nearest-neighbour generator: the n candidates), so most retrieved examples are never fetched.

Fetched bytes go to a disk cache shared by the actors of a node (``cache_dir``), bounded by ``max_bytes``
(oldest files evicted first). Transient storage errors are retried (``rag4dmc.pipeline.io.datasets.with_retries``).
An image that cannot be fetched gives None and a reason, which the stage records in the row's provenance.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

from rag4dmc.pipeline.config import ColumnsConfig
from rag4dmc.pipeline.io.datasets import detect_format, read_shard, with_retries
from rag4dmc.pipeline.io.storage import url_to_fs

log = logging.getLogger(__name__)

DEFAULT_CACHE_MB = 1024
CACHE_DIR = Path(tempfile.gettempdir()) / "rag4dmc-example-images"
EVICT_EVERY = 64  # puts between two scans of the cache's size


def location_of(uri: str | None, shard: str | None, row: int | None) -> str | None:
    """A printable location: the URI, or ``shard#row``; None when the entry has neither."""
    if uri:
        return uri
    if shard and row is not None:
        return f"{shard}#{int(row)}"
    return None


class ExampleImages:
    """Fetches example images by location; counts fetches, cache hits and failures."""

    def __init__(self, storage_options: dict | None = None, max_bytes: int = DEFAULT_CACHE_MB * 2**20,
                 cache_dir: str | Path | None = None, columns: ColumnsConfig = ColumnsConfig()):
        self.storage_options, self.columns = storage_options, columns
        self.max_bytes = max_bytes
        self.cache = Path(cache_dir or CACHE_DIR)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.fetches = self.hits = self.failures = 0
        self._puts = 0

    def get(self, uri: str | None, shard: str | None = None, row: int | None = None) -> tuple[bytes | None, str | None]:
        """(image bytes, None), or (None, why not)."""
        where = location_of(uri, shard, row)
        if where is None:
            return None, "the knowledge base has no image location for this entry"
        path = self.cache / hashlib.sha1(where.encode()).hexdigest()
        try:
            data = path.read_bytes()
            self.hits += 1
            return data, None
        except FileNotFoundError:
            pass
        self.fetches += 1
        try:
            data = self._fetch_uri(uri) if uri else self._fetch_row(shard, int(row))
        except Exception as exc:  # noqa: BLE001 - any failure skips this example, with its reason
            self.failures += 1
            return None, f"image {where} could not be fetched: {type(exc).__name__}: {exc}"
        if not data:
            self.failures += 1
            return None, f"image {where} is empty"
        try:
            self._put(path, data)
        except OSError as exc:  # a full or read-only cache costs a refetch later, never the example
            log.warning("could not cache example image %s: %s", where, exc)
        return data, None

    def _fetch_uri(self, uri: str) -> bytes:
        fs, path = url_to_fs(uri, self.storage_options)
        return with_retries(lambda: fs.cat_file(path))

    def _fetch_row(self, shard: str, row: int) -> bytes | None:
        """Row ``row`` of an input shard: parquet reads only the row group that holds it; other formats read the
        shard once and cache all of its images (their neighbours are likely to be asked for next)."""
        if detect_format(shard) == "parquet":
            fs, path = url_to_fs(shard, self.storage_options)

            def read() -> bytes | None:
                with fs.open(path, "rb") as f:
                    pf = pq.ParquetFile(f)
                    start = 0
                    for g in range(pf.num_row_groups):
                        rows = pf.metadata.row_group(g).num_rows
                        if row < start + rows:
                            col = self.columns.image
                            if col not in pf.schema_arrow.names:
                                raise KeyError(f"{shard} has no image column {col!r} (columns: "
                                               f"{pf.schema_arrow.names})")
                            value = pf.read_row_group(g, columns=[col]).column(col)[row - start].as_py()
                            return value.get("bytes") if isinstance(value, dict) else value
                        start += rows
                raise IndexError(f"row {row} is past the end of {shard} ({start} rows)")

            value = with_retries(read)
            if isinstance(value, str):  # the shard holds a path / URI
                return self._fetch_uri(value)
            return value
        result = read_shard(shard, self.columns, storage_options=self.storage_options)
        if result.table.num_rows <= row:
            raise IndexError(f"row {row} is not in {shard} ({result.table.num_rows} rows readable)")
        images = result.table.column("image").to_pylist()
        for i, data in enumerate(images):
            if data and i != row:
                try:
                    self._put(self.cache / hashlib.sha1(f"{shard}#{i}".encode()).hexdigest(), data)
                except OSError:
                    break
        if images[row] is None and result.table.column("image_uri")[row].as_py():
            return self._fetch_uri(result.table.column("image_uri")[row].as_py())
        return images[row]

    def _put(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(path)
        self._puts += 1
        if self._puts % EVICT_EVERY == 0:
            self.evict()

    def evict(self) -> None:
        """Remove the oldest cached images until the cache holds at most ``max_bytes``."""
        files = []
        for p in self.cache.iterdir():
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            files.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files):
            if total <= self.max_bytes:
                break
            try:
                p.unlink()
                total -= size
            except FileNotFoundError:
                pass

    def stats(self) -> dict:
        return {"fetches": self.fetches, "cache_hits": self.hits, "failures": self.failures}
