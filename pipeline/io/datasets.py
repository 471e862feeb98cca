"""Dataset I/O: parquet, JSONL and WebDataset tar shards (img2dataset layout), local or s3:// via fsspec.

Every reader returns the canonical sample schema (:data:`CANONICAL_SCHEMA`): ``id``, ``image`` (bytes),
``image_uri`` (when the image column holds a path or URI instead of bytes), ``text``, ``source_shard``
and ``input_error`` (why a row is unusable, e.g. a text that is not a string; null for good rows).
A null, empty or whitespace-only value means the modality is missing. A shard that cannot be read, or
a tar member that is corrupt, is reported in :attr:`ShardResult.errors` and the rest is read: only an
input path that does not exist or holds no shards is an exception.

A shard is fetched whole (with retries for transient storage errors) and parsed in memory, so a read
task holds one shard at a time; img2dataset's shards are a few hundred MB at most.
"""

from __future__ import annotations

import io
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from rag4dmc.pipeline.config import ColumnsConfig
from rag4dmc.pipeline.io.storage import is_remote, url_to_fs
from rag4dmc.pipeline.io.webdataset import (
    IMAGE_EXTENSIONS,
    META_EXTENSION,
    TEXT_EXTENSION,
    image_extension,
    parse_tar,
    tar_bytes,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

FORMATS = ("parquet", "jsonl", "webdataset")
SHARD_EXTENSIONS = {"parquet": (".parquet",), "jsonl": (".jsonl",), "webdataset": (".tar",)}
DEFAULT_COLUMNS = ColumnsConfig()

RETRY_ATTEMPTS = 4
RETRY_BASE_DELAY_S = 0.5  # the readers look this up at call time, so a test (or a caller) can tune it
RETRY_JITTER = 0.25  # each delay is base * 2**attempt * (1 + U(0, jitter)): growing, never colliding
NOT_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)

SUSPECT_SAMPLE = "a neighbouring tar member was unreadable, so this sample may be missing a member"

LABEL_COLUMN = "label"  # read_shard appends it (strings) when columns.label names an input column
CANONICAL_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("image", pa.binary()),
    ("image_uri", pa.string()),
    ("text", pa.string()),
    ("source_shard", pa.string()),
    ("input_error", pa.string()),
])



class ShardFormatError(ValueError):
    """A shard that is readable but does not hold the configured columns."""


@dataclass
class ShardResult:
    """One shard in the canonical schema, plus what could not be read (shard- or member-level)."""

    table: pa.Table
    errors: list[str] = field(default_factory=list)


@dataclass
class _RawRows:
    """A shard's rows as plain values, before canonicalisation; ``problems`` holds per-row errors."""

    ids: list[Any]
    images: list[Any]
    texts: list[Any]
    problems: list[str | None]
    labels: list[Any] = field(default_factory=list)  # only when columns.label is set

    @classmethod
    def empty(cls) -> _RawRows:
        return cls([], [], [], [], [])


def with_retries(fn: Callable[[], T], attempts: int = RETRY_ATTEMPTS, base_delay: float = RETRY_BASE_DELAY_S,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """Call ``fn``; retry transient storage errors (``OSError`` but not missing/forbidden paths) with backoff."""
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    for attempt in range(attempts):
        try:
            return fn()
        except NOT_TRANSIENT:
            raise
        except OSError as exc:
            if attempt == attempts - 1:
                raise
            delay = base_delay * 2**attempt * (1 + random.uniform(0, RETRY_JITTER))
            log.warning("transient storage error (%s); retry %d/%d in %.2fs", exc, attempt + 1, attempts - 1, delay)
            sleep(delay)
    raise AssertionError("unreachable")


def _check_format(format: str) -> None:
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"unknown dataset format {format!r}: use 'auto' or one of {', '.join(FORMATS)}")


def detect_format(uri: str) -> str:
    """The shard format from the file extension (.parquet, .jsonl, .tar)."""
    for fmt, exts in SHARD_EXTENSIONS.items():
        if uri.endswith(exts):
            return fmt
    known = ", ".join(e for exts in SHARD_EXTENSIONS.values() for e in exts)
    raise ValueError(f"cannot tell the format of {uri} (known extensions: {known}); pass the format explicitly")


def _is_data_file(path: str) -> bool:
    return not PurePosixPath(path).name.startswith((".", "_"))  # _SUCCESS, .crc, _stats.json ...


def list_shards(path: str, storage_options: dict | None = None, format: str = "auto") -> list[str]:
    """The shard files at ``path`` (one file or a folder of shards), sorted; raises if there are none."""
    _check_format(format)
    fs, root = url_to_fs(path, storage_options)
    if not with_retries(lambda: fs.exists(root), base_delay=RETRY_BASE_DELAY_S):
        raise FileNotFoundError(f"input {path} does not exist: check the path and the storage options "
                                "(endpoint, credentials)")
    if with_retries(lambda: fs.isfile(root), base_delay=RETRY_BASE_DELAY_S):
        if format == "auto":
            detect_format(path)
        return [path]
    found = sorted(with_retries(lambda: fs.find(root), base_delay=RETRY_BASE_DELAY_S))
    formats = [format] if format != "auto" else list(FORMATS)
    by_format = {f: [p for p in found if p.endswith(SHARD_EXTENSIONS[f]) and _is_data_file(p)] for f in formats}
    present = [f for f, files in by_format.items() if files]
    if not present:
        wanted = ", ".join(e for f in formats for e in SHARD_EXTENSIONS[f])
        raise FileNotFoundError(f"no shards under {path}: expected files ending in {wanted}")
    if len(present) > 1:
        counts = ", ".join(f"{len(by_format[f])} {f}" for f in present)
        raise ValueError(f"{path} holds shards of several formats ({counts}); pass the format explicitly "
                         "(img2dataset writes .parquet metadata beside its .tar shards: use 'webdataset')")
    protocol = path.split("://", 1)[0] + "://" if "://" in path else ""
    return [p if p.startswith(protocol) else protocol + p for p in by_format[present[0]]]


def read_shard(uri: str, columns: ColumnsConfig = DEFAULT_COLUMNS, storage_options: dict | None = None,
               format: str = "auto", attempts: int = RETRY_ATTEMPTS) -> ShardResult:
    """One shard in the canonical schema; unreadable or corrupt content is reported, never raised."""
    _check_format(format)
    fmt = detect_format(uri) if format == "auto" else format
    try:
        fs, path = url_to_fs(uri, storage_options)
        data = with_retries(lambda: fs.cat_file(path), attempts, RETRY_BASE_DELAY_S)
    except OSError as exc:
        tries = "" if isinstance(exc, NOT_TRANSIENT) else f" after {attempts} attempts"
        return ShardResult(_empty(columns), [f"could not read shard {uri}{tries}: {type(exc).__name__}: {exc}"])
    errors: list[str] = []
    try:
        if fmt == "parquet":
            raw = _parse_parquet(data, columns)
        elif fmt == "jsonl":
            raw, errors = _parse_jsonl(data, uri, columns)
        else:
            raw, errors = _parse_tar(data, uri, columns)
    except ShardFormatError as exc:
        return ShardResult(_empty(columns), [f"shard {uri}: {exc}"])
    except Exception as exc:  # noqa: BLE001 - a corrupt shard is reported and the job carries on
        return ShardResult(_empty(columns), [f"corrupt {fmt} shard {uri}: {type(exc).__name__}: {exc}"])
    table = _canonical(raw, uri)
    if columns.label:  # an extra column after the canonical ones, for the callers that asked for it
        table = table.append_column(LABEL_COLUMN, pa.array([None if v is None else str(v) for v in raw.labels],
                                                            pa.string()))
    return ShardResult(table, errors)


def _empty(columns: ColumnsConfig) -> pa.Table:
    table = CANONICAL_SCHEMA.empty_table()
    return table.append_column(LABEL_COLUMN, pa.array([], pa.string())) if columns.label else table


def read_dataset(path: str, columns: ColumnsConfig = DEFAULT_COLUMNS, storage_options: dict | None = None,
                 format: str = "auto") -> tuple[pa.Table, list[str]]:
    """Every shard at ``path`` in one canonical table (driver side, small data) and the read errors."""
    tables, errors = [], []
    for shard in list_shards(path, storage_options, format):
        result = read_shard(shard, columns, storage_options, format)
        tables.append(result.table)
        errors.extend(result.errors)
    return pa.concat_tables(tables), errors


# --- parsing -----------------------------------------------------------------------------------


def _require_modality_column(names: list[str] | set[str], columns: ColumnsConfig) -> None:
    if columns.image not in names and columns.text not in names:
        raise ShardFormatError(f"neither the image column {columns.image!r} nor the text column {columns.text!r} "
                               f"exists (columns: {', '.join(sorted(names))}); set columns.image / columns.text")


def _parse_parquet(data: bytes, columns: ColumnsConfig) -> _RawRows:
    """The id/image/text columns of a parquet file (other columns are not decoded)."""
    names = pq.read_schema(io.BytesIO(data)).names
    _require_modality_column(names, columns)
    wanted = [c for c in (columns.id, columns.image, columns.text, columns.label) if c in names]
    table = pq.read_table(io.BytesIO(data), columns=wanted)
    n = table.num_rows

    def values(name: str | None) -> list[Any]:
        return table.column(name).to_pylist() if name in wanted else [None] * n

    return _RawRows(values(columns.id), values(columns.image), values(columns.text), [None] * n,
                    values(columns.label) if columns.label else [])


def _parse_jsonl(data: bytes, shard: str, columns: ColumnsConfig) -> tuple[_RawRows, list[str]]:
    """One JSON object per line; an invalid line is an error naming the line, the others are read."""
    rows, errors, keys = _RawRows.empty(), [], set()
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            errors.append(f"{shard} line {number}: invalid JSON ({exc})")
            continue
        if not isinstance(obj, dict):
            errors.append(f"{shard} line {number}: expected a JSON object, got {type(obj).__name__}")
            continue
        keys.update(obj)
        rows.ids.append(obj.get(columns.id))
        rows.images.append(obj.get(columns.image))
        rows.texts.append(obj.get(columns.text))
        rows.problems.append(None)
        if columns.label:
            rows.labels.append(obj.get(columns.label))
    if rows.ids:
        _require_modality_column(keys, columns)
    return rows, errors


def _parse_tar(data: bytes, shard: str, columns: ColumnsConfig) -> tuple[_RawRows, list[str]]:
    """An input tar in img2dataset's layout as rows (``rag4dmc.pipeline.io.webdataset.parse_tar``: corrupt members
    are reported and skipped). The samples bordering a skipped region are kept but marked with an input error,
    since the lost member may have been theirs (a text-only row must not be completed with a new image when its
    own image was merely unreadable)."""
    parsed = parse_tar(data, shard)
    samples = {}
    for key, members in parsed.samples.items():
        sample = {}
        image = next((members[e] for e in members if e in IMAGE_EXTENSIONS), None)
        if image is not None:
            sample["image"] = image
        if TEXT_EXTENSION in members:
            sample["text"] = members[TEXT_EXTENSION]
        if META_EXTENSION in members:
            sample["meta"] = members[META_EXTENSION]
        samples[key] = sample
    return _tar_rows(samples, parsed.suspects, columns), parsed.errors


def _tar_rows(samples: dict[str, dict[str, Any]], suspects: set[str], columns: ColumnsConfig) -> _RawRows:
    """Rows from grouped members; the .json metadata gives the id, and image/text when no member does."""
    rows = _RawRows.empty()
    for key, sample in samples.items():
        problems = [SUSPECT_SAMPLE] if key in suspects else []
        meta: dict[str, Any] = {}
        if "meta" in sample:
            try:
                decoded = json.loads(sample["meta"])
                meta = decoded if isinstance(decoded, dict) else {}
            except ValueError as exc:
                problems.append(f"{key}.json is not valid JSON ({exc})")
        text = sample.get("text")
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                text, problems = None, [*problems, f"{key}.txt is not UTF-8 text"]
        rows.ids.append(meta.get(columns.id) if meta.get(columns.id) is not None else key)
        rows.images.append(sample.get("image", meta.get(columns.image)))
        rows.texts.append(text if "text" in sample else meta.get(columns.text))
        rows.problems.append("; ".join(problems) or None)
        if columns.label:
            rows.labels.append(meta.get(columns.label))
    return rows


# --- canonical rows ----------------------------------------------------------------------------


def derived_id(shard: str, index: int) -> str:
    """The id of a row whose input has none: shard file name and row number."""
    return f"{PurePosixPath(shard).name}:{index}"


def _resolve_uri(value: str, shard: str) -> str:
    """A relative image path is relative to the shard's folder; URIs and absolute paths stay as they are."""
    if "://" in value or value.startswith("/") or "/" not in shard:
        return value
    return f"{shard.rsplit('/', 1)[0]}/{value}"


def _image_value(value: Any, shard: str) -> tuple[bytes | None, str | None, str | None]:
    """(bytes, uri, problem) of one image cell: bytes, a path/URI, or a {bytes, path} struct."""
    if isinstance(value, dict):  # Hugging Face datasets' Image feature
        data, path = value.get("bytes"), value.get("path")
        value = data if data else path
    if value is None:
        return None, None, None
    if isinstance(value, (bytes, bytearray)):
        return (bytes(value) or None), None, None
    if isinstance(value, str):
        return None, (_resolve_uri(value.strip(), shard) if value.strip() else None), None
    return None, None, f"image is neither bytes nor a path/URI string ({type(value).__name__})"


def _text_value(value: Any) -> tuple[str | None, str | None]:
    """(text, problem) of one text cell; empty or whitespace-only text is missing."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, None
    if isinstance(value, str):
        return value, None
    return None, f"text is not a string ({type(value).__name__}: {str(value)[:40]!r})"


def _canonical(raw: _RawRows, shard: str) -> pa.Table:
    n = len(raw.ids)
    ids, images, uris, texts, problems = [], [], [], [], []
    for i in range(n):
        image, uri, image_problem = _image_value(raw.images[i], shard)
        text, text_problem = _text_value(raw.texts[i])
        ids.append(str(raw.ids[i]) if raw.ids[i] is not None else derived_id(shard, i))
        images.append(image)
        uris.append(uri)
        texts.append(text)
        found = [p for p in (raw.problems[i], image_problem, text_problem) if p]
        problems.append("; ".join(found) or None)
    return pa.table([ids, images, uris, texts, [shard] * n, problems], schema=CANONICAL_SCHEMA)


# --- writers (fixtures, demo data) -------------------------------------------------------------


def _put(uri: str, payload: bytes, storage_options: dict | None) -> None:
    fs, path = url_to_fs(uri, storage_options)
    if not is_remote(uri):
        fs.makedirs(str(PurePosixPath(path).parent), exist_ok=True)
    with_retries(lambda: fs.pipe_file(path, payload), base_delay=RETRY_BASE_DELAY_S)


def write_parquet(table: pa.Table, uri: str, storage_options: dict | None = None,
                  row_group_size: int | None = None) -> None:
    """Write ``table`` as one parquet file at ``uri`` (any schema); ``row_group_size``: rows per row group (pyarrow's
    default when None)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size)
    _put(uri, buf.getvalue(), storage_options)


def write_jsonl(table: pa.Table, uri: str, storage_options: dict | None = None) -> None:
    """Write ``table`` as JSONL; binary cells become files beside it, referenced by relative path.

    Row ``i``'s bytes of column ``c`` go to ``<stem>_<c>/<i>.<ext>`` next to the JSONL file, which
    :func:`read_shard` resolves back into ``image_uri`` values.
    """
    stem = PurePosixPath(uri.rsplit("/", 1)[-1]).stem
    folder = uri.rsplit("/", 1)[0] if "/" in uri else "."
    binary = {f.name for f in table.schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)}
    lines = []
    for i, row in enumerate(table.to_pylist()):
        for name in binary & row.keys():
            if not row[name]:  # empty bytes: missing
                row[name] = None
                continue
            relative = f"{stem}_{name}/{i:06d}.{image_extension(row[name], default='bin')}"
            _put(f"{folder}/{relative}", row[name], storage_options)
            row[name] = relative
        lines.append(json.dumps(row, default=str))
    _put(uri, ("\n".join(lines) + "\n").encode(), storage_options)


def write_webdataset(table: pa.Table, uri: str, storage_options: dict | None = None,
                     columns: ColumnsConfig = DEFAULT_COLUMNS) -> None:
    """Write ``table`` as one tar shard in the img2dataset layout: ``<key>.<img>``, ``<key>.txt``, ``<key>.json``.

    The image column's bytes become the image member (a path/URI string goes into the JSON instead),
    the text column the .txt member, other binary columns ``<key>.<column>.<ext>`` members and every
    other column the JSON metadata.
    """
    samples = []
    for i, row in enumerate(table.to_pylist()):
        members: dict[str, bytes] = {}
        image, text = row.pop(columns.image, None), row.pop(columns.text, None)
        if isinstance(image, bytes):
            if image:  # empty bytes: the image is missing
                members[image_extension(image)] = image
        elif image is not None:
            row[columns.image] = image
        if text is not None:
            members[TEXT_EXTENSION] = str(text).encode()
        for name, value in list(row.items()):
            if isinstance(value, bytes):
                members[f"{name}.{image_extension(value, default='bin')}"] = row.pop(name)
        members[META_EXTENSION] = json.dumps(row, default=str).encode()
        samples.append((f"{i:09d}", list(members.items())))
    _put(uri, tar_bytes(samples), storage_options)
