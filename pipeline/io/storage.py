"""Local folders and object storage behind one small interface (fsspec/s3fs, and pyarrow for Ray Data)."""

from __future__ import annotations

import io
import logging
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from pyarrow.fs import FSSpecHandler, PyFileSystem

from rag4dmc.pipeline.config import StorageConfig

log = logging.getLogger(__name__)

LOCAL_PROTOCOLS = ("file", "local")
UNOPTIONED_PROTOCOLS = (*LOCAL_PROTOCOLS, "http", "https")  # the storage options are not for these (aiohttp
# refuses s3fs's keywords: a LAION url would fail to fetch)


# botocore decides each retry of an object-storage request (storage.retries, standard mode) and says so at DEBUG only
RETRY_LOGGER = "botocore.retries.standard"
RETRY_LINES = ("Retry needed", "Max attempts")


class _RetriesAsWarnings(logging.Filter):
    """On botocore's retry logger: its retry lines become this module's warnings; its other DEBUG lines (one per
    request: "Not retrying request.") are dropped here, before any handler formats them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG:
            return True
        message = record.getMessage()
        if message.startswith(RETRY_LINES):
            log.warning("object storage: %s (a transient error: 500, 503 SlowDown or a dropped connection)", message)
        return False


def log_storage_retries() -> None:
    """Make object-storage retries visible in the logs (idempotent; every process that does I/O calls it)."""
    logger = logging.getLogger(RETRY_LOGGER)
    if not any(isinstance(f, _RetriesAsWarnings) for f in logger.filters):
        logger.addFilter(_RetriesAsWarnings())
        logger.setLevel(logging.DEBUG)


def takes_options(uri: str) -> bool:
    """Whether the storage options apply to ``uri``: object storage and other remote filesystems, not local
    paths or http(s) URLs."""
    from fsspec.utils import get_protocol

    return get_protocol(uri) not in UNOPTIONED_PROTOCOLS


def is_remote(uri: str) -> bool:
    """Whether ``uri`` names object storage (or another remote filesystem) rather than a local path."""
    from fsspec.utils import get_protocol

    return get_protocol(uri) not in LOCAL_PROTOCOLS


def url_to_fs(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of ``uri`` and its path there; the storage options go to object storage only, not to
    local paths or http(s) URLs (the one rule every reader and writer of rag4dmc follows)."""
    log_storage_retries()
    return fsspec.core.url_to_fs(uri, **((storage_options or {}) if takes_options(uri) else {}))


class Storage:
    """Reads and writes paths that are local or ``s3://``, with the job's storage options (every path goes through
    :func:`url_to_fs`, the one rule)."""

    def __init__(self, cfg: StorageConfig = StorageConfig()):
        self.cfg = cfg
        self.options = cfg.fsspec_options()

    def locate(self, path: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """The filesystem of ``path`` and its path there."""
        return url_to_fs(path, self.options)

    def fs(self, path: str) -> fsspec.AbstractFileSystem:
        return self.locate(path)[0]

    def exists(self, path: str) -> bool:
        fs, p = self.locate(path)
        return fs.exists(p)

    def read_bytes(self, path: str) -> bytes:
        fs, p = self.locate(path)
        return fs.cat_file(p)

    def write_bytes(self, path: str, data: bytes) -> None:
        fs, p = self.locate(path)
        if isinstance(fs, LocalFileSystem):
            fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(p, data)

    def open(self, path: str, mode: str = "rb"):
        fs, p = self.locate(path)
        return fs.open(p, mode)

    def glob(self, pattern: str) -> list[str]:
        proto = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
        fs, p = self.locate(pattern)
        return sorted(proto + found for found in fs.glob(p))

    def write_table(self, table: pa.Table, path: str) -> None:
        """Write a parquet file in one piece (object stores replace objects atomically; locally via rename)."""
        buf = io.BytesIO()
        pq.write_table(table, buf)
        fs, p = self.locate(path)
        if isinstance(fs, LocalFileSystem):
            fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
            tmp = f"{p}.{uuid.uuid4().hex[:8]}.tmp"  # unique: two writers of one name never share a temp file
            fs.pipe_file(tmp, buf.getvalue())
            fs.mv(tmp, p)
        else:
            fs.pipe_file(p, buf.getvalue())

    def move(self, src: str, dst: str) -> None:
        fs, p = self.locate(src)
        fs.mv(p, self.locate(dst)[1])

    def remove(self, path: str) -> None:
        fs, p = self.locate(path)
        if fs.exists(p):
            fs.rm(p, recursive=True)

    def arrow_fs(self, path: str) -> PyFileSystem | None:
        """A pyarrow filesystem for Ray Data over the same fsspec settings (None: Ray's local default)."""
        fs = self.fs(path)
        return None if isinstance(fs, LocalFileSystem) else PyFileSystem(FSSpecHandler(fs))

    def arrow_path(self, path: str) -> str:
        """``path`` as Ray Data wants it beside :meth:`arrow_fs`: bucket/key for object storage."""
        return self.locate(path)[1] if is_remote(path) else path
