"""Where model weights come from, for every model class (encoders and generators): the one set of rules.

Weights are a local file or folder, an ``s3://`` (any fsspec URL) object or prefix downloaded once into
``model_dir`` (or :data:`WEIGHTS_CACHE`), or a Hugging Face Hub name already in the hub cache. Nothing is
ever downloaded from a model hub at run time: every hub lookup is cache-only (:func:`hub_offline`).
Each function returns ``None`` when the weights are not there; the model classes raise their own
not-found errors, which name the flag to set.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from rag4dmc.pipeline.io.storage import url_to_fs

HF_CACHE = "the Hugging Face cache"  # how errors name the hub cache when no model_dir is given
WEIGHTS_CACHE = Path(tempfile.gettempdir()) / "rag4dmc-weights"  # object-storage weights when no model_dir


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Within the block every Hugging Face Hub lookup is cache-only (``HF_HUB_OFFLINE=1``, set at run time),
    so missing weights fail at once instead of after network retries."""
    from huggingface_hub import constants

    saved, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def cache_folder(uri: str, model_dir: str | None) -> Path:
    """The folder an object-storage URI is downloaded into (one per URI)."""
    return Path(model_dir or WEIGHTS_CACHE) / hashlib.sha256(uri.encode()).hexdigest()[:16]


def fetch_object(uri: str, model_dir: str | None = None, storage_options: dict | None = None) -> str | None:
    """Download an object-storage file once (atomically: concurrent actors fetch too); its local path, or None
    when there is no such object."""
    cache = cache_folder(uri, model_dir)
    local = cache / os.path.basename(uri.rstrip("/"))
    if local.is_file():
        return str(local)
    fs, path = url_to_fs(uri, storage_options)
    if not fs.isfile(path):
        return None
    cache.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=cache, suffix=".partial")
    os.close(fd)
    try:
        fs.get_file(path, partial)
        os.replace(partial, local)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return str(local)


def fetch_prefix(uri: str, model_dir: str | None, marker: str, storage_options: dict | None = None) -> str | None:
    """Download an object-storage folder (one holding ``marker``) once, atomically; its local path, or None when
    the prefix holds no ``marker``."""
    cache = cache_folder(uri, model_dir)
    if (cache / marker).is_file():
        return str(cache)
    fs, path = url_to_fs(uri, storage_options)
    path = path.rstrip("/")
    if not fs.isfile(f"{path}/{marker}"):
        return None
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = tempfile.mkdtemp(dir=cache.parent, prefix=f"{cache.name}.partial-")
    try:
        fs.get(f"{path}/", partial, recursive=True)
        os.rename(partial, cache)  # atomic; fails when another actor finished first, whose copy is used
    except OSError:
        if not (cache / marker).is_file():
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return str(cache)


def cached_snapshot(repo_id: str, cache_dir: str | None) -> str | None:
    """The hub cache's snapshot folder of ``repo_id``, or None; never a network call."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True)
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError), or not a repo id at all
        return None
