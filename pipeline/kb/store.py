"""The knowledge base on disk or object storage: save, load, local copies, the entries file (format 4).

Layout of a knowledge base folder (local or object storage)::

    manifest.json      format, version, encoder, counts, config, shard list (written last: marks completion)
    entries.arrow      one row per KB entry: id, source (internal/external), text, and where its image is
                       (image_uri, or image_shard + image_row of the input data), as an uncompressed Arrow
                       IPC file memory-mapped by its readers. Never the image bytes: completion actors fetch
                       the few example images they use (rag4dmc.pipeline.io.kb_images).
    mapping.safetensors  the bidirectional image<->text MLP (its architecture in the metadata); loaded as
                       ``MappingArrays``, so a process that only queries the KB never imports torch
                       (format 3 kept it in the torch file mapping.pt: still read, with torch)
    report.json        build report: mapping, purification with sample sizes, index recall, stage costs
    shard-00000/       rows [start, stop): image/ and text/ VectorIndex folders (FAISS index, float16 vectors)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa

from rag4dmc.pipeline.core.index import VectorIndex
from rag4dmc.pipeline.core.mapping_arrays import MappingArrays
from rag4dmc.pipeline.core.retrieval import MODALITIES, Shard
from rag4dmc.pipeline.io.storage import url_to_fs
from rag4dmc.pipeline.kb.knowledge_base import KnowledgeBase

FORMAT_VERSION = 4  # 4: the mapping as safetensors; 3: entries by reference, float16 vectors; 2: image bytes
MAPPING_FILES = {3: "mapping.pt", 4: "mapping.safetensors"}  # the formats this version reads: the mapping's file
MAPPING_FILE = MAPPING_FILES[FORMAT_VERSION]
ENTRIES_FILE = "entries.arrow"
ENTRIES_BATCH_ROWS = 4096  # rows per IPC record batch of entries.arrow
CHECKSUM_CHUNK_BYTES = 8 * 2**20
PARTS_DIR = "parts"  # build intermediates (rag4dmc.pipeline.kb.build), removed when the build is done
ENTRY_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("text", pa.string()),
                          ("image_uri", pa.string()), ("image_shard", pa.string()), ("image_row", pa.int64())])


def shard_dir(i: int) -> str:
    return f"shard-{i:05d}"


def version_of(manifest: dict, content: list[bytes]) -> str:
    """A KB's version: a hash of its manifest (without the creation time) and of content that identifies it."""
    h = hashlib.sha256(json.dumps({k: v for k, v in manifest.items() if k not in ("created", "version")},
                                  sort_keys=True).encode())
    for c in content:
        h.update(c)
    return h.hexdigest()[:16]


def new_manifest(encoder: dict, rows: int, dims: tuple[int, int], cfg, calibration: dict | None, shards: list[dict],
                 content: list[bytes], input_columns: dict | None = None) -> dict:
    """The manifest of a KB in this format, with its version."""
    import time

    from rag4dmc.pipeline.kb.calibrate import calibration_summary

    manifest = {"format": FORMAT_VERSION, "encoder": encoder or {}, "rows": rows, "image_dim": int(dims[0]),
                "text_dim": int(dims[1]), "shards": shards, "config": cfg.model_dump(mode="json"),
                "calibration": calibration_summary(calibration), "input_columns": input_columns or {},
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    manifest["version"] = version_of(manifest, content)
    return manifest


def write_small(uri: str, mapping, report: dict, manifest: dict,
                storage_options: dict | None = None) -> None:
    """The mapping (``CrossModalMapper`` or ``MappingArrays``), report.json, then manifest.json (last: it marks the
    KB complete) at ``uri``."""
    fs, path = url_to_fs(uri, storage_options)
    fs.makedirs(path, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rag4dmc-kb-") as tmp:
        mapping.save(Path(tmp) / MAPPING_FILE)
        fs.put_file(str(Path(tmp) / MAPPING_FILE), f"{path}/{MAPPING_FILE}")
    fs.pipe_file(f"{path}/report.json", json.dumps(report, indent=2, default=json_default).encode())
    manifest["files"] = describe_files(fs, path, loaded_files(manifest))
    fs.pipe_file(f"{path}/manifest.json", json.dumps(manifest, indent=2).encode())


class KBFileError(RuntimeError):
    """A knowledge base's file is missing, cut short or not the one its manifest describes."""


def loaded_files(manifest: dict) -> list[str]:
    """The files of a KB that :func:`load` reads, relative to its root."""
    files = [MAPPING_FILES[manifest["format"]], "report.json", ENTRIES_FILE]
    for shard in manifest["shards"]:
        files += [f"{shard['path']}/{m}/{f}" for m in MODALITIES for f in VectorIndex.files(with_index=True)]
    return files


def describe_files(fs, root: str, files: list[str]) -> dict[str, dict]:
    """Size and checksum of each file: the object store's own (its ETag) where it keeps one, else sha256 of the
    content (read once)."""
    out = {}
    for rel in files:
        info = fs.info(f"{root}/{rel}")
        entry = {"size": int(info["size"])}
        etag = info.get("ETag") or info.get("etag")
        if etag:
            entry["etag"] = str(etag).strip('"')
        else:
            with fs.open(f"{root}/{rel}", "rb") as fh:
                entry["sha256"] = _sha256(fh)
        out[rel] = entry
    return out


def _sha256(fh) -> str:
    digest = hashlib.sha256()
    while chunk := fh.read(CHECKSUM_CHUNK_BYTES):
        digest.update(chunk)
    return digest.hexdigest()


def _rebuild_hint(uri: str) -> str:
    return (f"copy the knowledge base to {uri} again from where it was built (whole), or rebuild it with "
            "`rag4dmc kb build`")


def check_size(uri: str, rel: str, local: Path, expected: dict | None) -> None:
    """A loaded file against its manifest entry: there, and of the recorded size."""
    if expected is None or rel not in expected:
        return
    if not local.is_file():
        raise KBFileError(f"knowledge base {uri}: {rel} is missing; {_rebuild_hint(uri)}")
    size = local.stat().st_size
    if size != expected[rel]["size"]:
        raise KBFileError(f"knowledge base {uri}: {rel} is {size} bytes, its manifest says {expected[rel]['size']} "
                          f"(a partial copy, or a file of another build); {_rebuild_hint(uri)}")


def check_copy(uri: str, rel: str, local: Path, remote_info: dict, expected: dict | None) -> None:
    """A file just copied to this node against its manifest entry: its size, and its checksum (the object's ETag as
    the store reports it, or the copy's sha256)."""
    if expected is None or rel not in expected:
        return
    check_size(uri, rel, local, expected)
    want = expected[rel]
    if "etag" in want:
        got = str(remote_info.get("ETag") or remote_info.get("etag") or "").strip('"')
        ok = got == want["etag"]
    else:
        with open(local, "rb") as fh:
            ok = _sha256(fh) == want["sha256"]
    if not ok:
        raise KBFileError(f"knowledge base {uri}: {rel} does not match the checksum in its manifest (a file of another "
                          f"build, or damaged); {_rebuild_hint(uri)}")


def json_default(v):
    """JSON for the numpy arrays and scalars a report holds (anything else as its str)."""
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return str(v)


def remove_parts(uri: str, storage_options: dict | None = None) -> None:
    """Remove the build's intermediate parts once the KB is complete."""
    fs, path = url_to_fs(uri, storage_options)
    if fs.exists(f"{path}/{PARTS_DIR}"):
        fs.rm(f"{path}/{PARTS_DIR}", recursive=True)


def local_copy(uri: str, storage_options: dict | None = None, cache_dir: str | None = None,
               parts: list[str] | None = None) -> Path:
    """A local folder holding the knowledge base at ``uri``.

    Remote URIs are downloaded into a per-version cache, and only ``parts`` (paths of files or folders
    relative to the KB root; None: everything): a retrieval actor fetches its own shard group, not the
    whole index. Each part is downloaded once per node and moved into place atomically, so actors that
    start together on a node share the copy.
    """
    from fsspec.implementations.local import LocalFileSystem

    fs, path = url_to_fs(uri, storage_options)
    if not fs.exists(f"{path}/manifest.json"):
        raise FileNotFoundError(f"no knowledge base at {uri} (manifest.json missing): run `rag4dmc kb build` first")
    if isinstance(fs, LocalFileSystem):
        return Path(path)
    manifest = fs.cat_file(f"{path}/manifest.json")
    cache = Path(cache_dir or Path(tempfile.gettempdir()) / "rag4dmc-kb-cache") / json.loads(manifest)["version"]
    cache.mkdir(parents=True, exist_ok=True)
    if parts is None:
        parts = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    expected = json.loads(manifest).get("files")  # size and checksum per file (KBs built before: none)
    for part in dict.fromkeys([p for p in parts if p != "manifest.json"]):
        dest = cache / part
        if dest.exists():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
        if fs.isdir(f"{path}/{part}"):
            fs.get(f"{path}/{part}/", str(tmp), recursive=True)
        else:
            if expected is not None and part in expected and not fs.exists(f"{path}/{part}"):
                raise KBFileError(f"knowledge base {uri}: {part} is missing; {_rebuild_hint(uri)}")
            fs.get_file(f"{path}/{part}", str(tmp))
            try:
                check_copy(uri, part, tmp, fs.info(f"{path}/{part}"), expected)
            except KBFileError:
                tmp.unlink(missing_ok=True)
                raise
        try:
            tmp.rename(dest)
        except OSError:  # another process on this node moved its copy into place first
            shutil.rmtree(tmp, ignore_errors=True)
    if not (cache / "manifest.json").exists():
        tmp = cache / f".manifest.json.partial-{os.getpid()}"
        tmp.write_bytes(manifest)
        tmp.rename(cache / "manifest.json")
    return cache


def write_entries(entries: pa.Table, path: str | Path) -> None:
    """The entries as an uncompressed Arrow IPC file (memory-mappable)."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, entries.schema) as writer:
        writer.write_table(entries, max_chunksize=ENTRIES_BATCH_ROWS)


def open_entries(path: str | Path) -> pa.Table:
    """The entries file memory-mapped: no row is read until it is used, and actors on one node share pages."""
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


def load_entries(uri: str, storage_options: dict | None = None) -> pa.Table:
    """The knowledge base's entries (``ENTRY_SCHEMA``), memory-mapped from its local copy."""
    root = local_copy(uri, storage_options, parts=[ENTRIES_FILE])
    _check_format(json.loads((root / "manifest.json").read_text()), uri)
    return open_entries(root / ENTRIES_FILE)


def take_entries(entries: pa.Table, ids: np.ndarray) -> dict[str, list]:
    """The given KB rows' columns, in order (one gather for a whole batch): id, text, and where the image is
    (image_uri, image_shard, image_row)."""
    rows = entries.take(pa.array(np.asarray(ids, dtype=np.int64)))
    return {c: rows.column(c).to_pylist() for c in rows.column_names}


def input_columns(uri: str, storage_options: dict | None = None):
    """The input columns the KB was built with (where an entry's ``image_shard`` keeps its image)."""
    from rag4dmc.pipeline.config import ColumnsConfig

    root = local_copy(uri, storage_options, parts=["manifest.json"])
    return ColumnsConfig(**json.loads((root / "manifest.json").read_text()).get("input_columns", {}))


def _check_format(manifest: dict, uri: str) -> None:
    if manifest.get("format") not in MAPPING_FILES:
        raise ValueError(f"knowledge base at {uri} has format {manifest.get('format')}, this version of rag4dmc "
                         f"reads formats {sorted(MAPPING_FILES)} (entries by reference, no image bytes): rebuild it "
                         "with `rag4dmc kb build`")


def load_mapping(path: Path):
    """A stored KB's mapping: ``MappingArrays`` (numpy, no torch), or from a format-3 torch file, the torch module."""
    if path.name == MAPPING_FILES[3]:
        from rag4dmc.pipeline.core.mapping import CrossModalMapper

        return CrossModalMapper.load(path)
    return MappingArrays.load(path)


def load(uri: str, storage_options: dict | None = None, shards: list[int] | None = None,
         with_entries: bool = True, searched: str | None = None):
    """Load a knowledge base (optionally only some shards, e.g. the one a retrieval actor holds).

    ``searched``: load only this modality's FAISS index (the other modality's vectors are still mapped for
    the fusion cross term); a retrieval actor searches one index. Entries are memory-mapped.
    """
    if searched not in (None, *MODALITIES):
        raise ValueError(f"searched must be one of {MODALITIES} or None, got {searched!r}")
    root = local_copy(uri, storage_options, parts=["manifest.json"])
    manifest = json.loads((root / "manifest.json").read_text())
    _check_format(manifest, uri)
    wanted = range(len(manifest["shards"])) if shards is None else shards
    mapping_file = MAPPING_FILES[manifest["format"]]
    parts = [mapping_file, "report.json", *([ENTRIES_FILE] if with_entries else [])]
    for i in wanted:
        for m in MODALITIES:
            parts += [f"{manifest['shards'][i]['path']}/{m}/{f}" for f in VectorIndex.files(with_index=searched in (None, m))]
    root = local_copy(uri, storage_options, parts=parts)
    for rel in parts:
        check_size(uri, rel, root / rel, manifest.get("files"))
    loaded = []
    for i in wanted:
        s = manifest["shards"][i]
        loaded.append(Shard(s["start"], s["stop"], *(
            VectorIndex.load(root / s["path"] / m, with_index=searched in (None, m)) for m in MODALITIES)))
    entries = open_entries(root / ENTRIES_FILE) if with_entries else pa.table({})
    report = json.loads((root / "report.json").read_text())
    return KnowledgeBase(entries, load_mapping(root / mapping_file), loaded, report, manifest, storage_options)
