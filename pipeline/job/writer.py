"""The output rows of the completion job (one per input row, with provenance) and how they are committed."""

from __future__ import annotations

import hashlib
import io
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasink

from rag4dmc.actors import faults
from rag4dmc.pipeline.io.webdataset import (
    META_EXTENSION,
    TEXT_EXTENSION,
    image_extension,
    iter_members,
    tar_bytes,
)
from rag4dmc.pipeline.job.reader import committed_keys as keys_in
from rag4dmc.pipeline.schema import (
    OUTPUT_SCHEMA,
    RETRIES,
    STAGES,
    STATUS_ABSTAINED,
    STATUS_COMPLETED,
    STATUS_FAILED,
    STATUS_OBSERVED,
    TASK_FAILED,
    TASK_OBSERVED,
)


def _missing(v) -> bool:
    return v is None or (isinstance(v, (float, np.floating)) and np.isnan(v))


def _column(batch: dict, name: str, n: int, default=None) -> list:
    """The column as Python values; nulls (which numpy batches may carry as NaN) become ``default``."""
    if name not in batch:
        return [default] * n
    return [default if _missing(v) else v for v in batch[name]]


def _floats(values) -> list | None:
    return None if values is None else [float(v) for v in values]


def finalize(batch: dict[str, np.ndarray], *, kb_version: str, config_hash: str) -> pa.Table:
    """Output rows (``OUTPUT_SCHEMA``) from a batch of any branch: observed, completed or failed."""
    n = len(batch["row_key"])
    task = _column(batch, "task", n)
    status = _column(batch, "status", n)
    error = _column(batch, "error", n, "")
    for i in range(n):
        if task[i] == TASK_FAILED:
            status[i] = STATUS_FAILED
        elif task[i] == TASK_OBSERVED:
            status[i] = STATUS_OBSERVED
        elif status[i] is None:
            status[i], error[i] = STATUS_FAILED, error[i] or f"row left the {task[i]} branch unprocessed"
    generated = _column(batch, "generated", n)
    data = {
        "row_key": _column(batch, "row_key", n),
        "id": _column(batch, "id", n),
        "image": [None if v is None or len(v) == 0 else bytes(v) for v in _column(batch, "image", n)],
        "image_uri": _column(batch, "image_uri", n),
        "text": _column(batch, "text", n),
        "generated": [g if s == STATUS_COMPLETED else None for g, s in zip(generated, status)],
        "status": status,
        "error": [e or None for e in error],
        "generator": _column(batch, "generator", n),
        "retrieved_ids": [None if v is None else [str(x) for x in v] for v in _column(batch, "retrieved_ids", n)],
        "fusion_scores": [_floats(v) for v in _column(batch, "fusion_scores", n)],
        "candidates": [None if v is None else list(v) for v in _column(batch, "candidates", n)],
        "candidate_ids": [None if v is None else [str(x) for x in v] for v in _column(batch, "candidate_ids", n)],
        "candidate_scores": [_floats(v) for v in _column(batch, "candidate_scores", n)],
        "chosen": [None if c is None or c < 0 else int(c) for c in _column(batch, "chosen", n, -1)],
        "confidence": [None if c is None else float(c) for c in _column(batch, "confidence", n)],
        "settings": _column(batch, "settings", n),
        "skipped_examples": [None if v is None else [str(x) for x in v] for v in _column(batch, "skipped_examples", n)],
        "kb_version": [kb_version] * n,
        "config_hash": [config_hash] * n,
        "source_shard": _column(batch, "source_shard", n),
    }
    for s in STAGES:
        data[f"seconds_{s}"] = [float(v) for v in _column(batch, f"seconds_{s}", n, 0.0)]
    data[RETRIES] = [int(v) for v in _column(batch, RETRIES, n, 0)]
    return pa.table(data, schema=OUTPUT_SCHEMA)


# ------------------------------------------------------------------------------------- output file formats
# The one place that knows the formats a committed file can have (``JobConfig.output_format``): its extension,
# how a table becomes the file's bytes and how the file is read back (rows, row keys, row count). Everything
# else goes through the functions below, which pick the format from a file's extension.
PARQUET, WEBDATASET = "parquet", "webdataset"
TAR_MEDIA = ("image", "text")  # the columns that are members of their own; every other column is in the json
_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9_-]")
MAX_KEY_CHARS = 80  # member names stay well under tar's 100-character name field


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def tar_key(row_key: str) -> str:
    """A row's WebDataset key: ``row_key`` with every character outside ``[A-Za-z0-9_-]`` as ``_`` (no dots,
    which end a key), plus a short hash of the real key when anything was replaced or cut, so two row keys
    never share a key. Fixed by the row key alone; the real one is in the row's json."""
    safe = _UNSAFE_KEY.sub("_", row_key)
    if safe == row_key and 0 < len(safe) <= MAX_KEY_CHARS:
        return safe
    return f"{safe[:MAX_KEY_CHARS - 9]}_{hashlib.sha1(row_key.encode()).hexdigest()[:8]}"


def _jsonable(v):
    """A cell as JSON: NaN (float or numpy) as null, numpy scalars and arrays as Python values."""
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and v != v:
        return None
    return v


def output_tar(table: pa.Table) -> bytes:
    """Output rows as one tar in img2dataset's layout (``rag4dmc.pipeline.io.webdataset``): per row
    ``<key>.jpg|png|webp`` (the image bytes' type), ``<key>.txt`` (the text) and ``<key>.json`` (every other column,
    and ``key``). A row lacks the member of a modality it has none of; a failed or abstained row has only its json
    (its text, if any, is in the json: a loader never meets a failed row's undecodable or unprocessed image, or
    an abstained row's half pair, as a sample)."""
    samples = []
    for row in table.to_pylist():
        key = tar_key(row["row_key"])
        image, text = row.pop("image", None), row.pop("text", None)
        members: list[tuple[str, bytes]] = []
        if row.get("status") in (STATUS_FAILED, STATUS_ABSTAINED):
            if text is not None:
                row["text"] = text
        else:
            if image:
                members.append((image_extension(image), image))
            if text is not None:
                members.append((TEXT_EXTENSION, text.encode("utf-8")))
        meta = {"key": key, **{k: _jsonable(v) for k, v in row.items()}}
        members.append((META_EXTENSION, json.dumps(meta, allow_nan=False, ensure_ascii=False).encode("utf-8")))
        samples.append((key, members))
    return tar_bytes(samples)


def read_parquet(fh, columns: list[str] | None = None) -> pa.Table:
    """A committed parquet file's rows (``columns`` only, when given); a column that a file from an earlier version
    lacks is read as nulls."""
    parquet = pq.ParquetFile(fh)
    names = set(parquet.schema_arrow.names)
    table = parquet.read(columns=None if columns is None else [c for c in columns if c in names])
    for name in (columns or []):
        if name not in names:
            table = table.append_column(OUTPUT_SCHEMA.field(name), pa.nulls(table.num_rows,
                                                                          OUTPUT_SCHEMA.field(name).type))
    return table if columns is None else table.select(columns)


def read_tar(fh, columns: list[str] | None = None) -> pa.Table:
    """A tar written by :func:`output_tar` as ``OUTPUT_SCHEMA`` rows (``columns`` only, when given); the image and
    text members are read only when those columns are asked for."""
    media = {c for c in TAR_MEDIA if columns is None or c in columns}

    def wanted(ext: str) -> bool:
        return ext == META_EXTENSION or ("text" if ext == TEXT_EXTENSION else "image") in media

    rows: dict[str, dict] = {}
    for key, ext, payload in iter_members(fh, wanted):
        row = rows.setdefault(key, {})
        if ext == META_EXTENSION:  # a failed row's text is in its json; any other row's is its .txt member
            row.update({k: v for k, v in json.loads(payload).items() if k not in row})
        elif ext == TEXT_EXTENSION:
            row["text"] = payload.decode("utf-8")
        else:
            row["image"] = payload
    table = pa.Table.from_pylist(list(rows.values()), schema=OUTPUT_SCHEMA)
    return table if columns is None else table.select(columns)


def _tar_row_keys(fh) -> list[str]:
    return [json.loads(payload)["row_key"] for *_, payload in iter_members(fh, lambda e: e == META_EXTENSION)]


def _tar_rows(fh) -> int:
    return sum(1 for _ in iter_members(fh, lambda e: e == META_EXTENSION))  # a row's json member: small


@dataclass(frozen=True)
class OutputFormat:
    """How committed files of one format are named, written and read back."""

    extension: str
    encode: Callable[[pa.Table], bytes]  # OUTPUT_SCHEMA rows -> the file's bytes
    read: Callable[..., pa.Table]  # (file, columns) -> OUTPUT_SCHEMA rows
    row_keys: Callable[[object], list[str]]  # file -> its rows' row_key
    num_rows: Callable[[object], int]  # file -> its row count (as cheaply as the format allows)


OUTPUT_FORMATS: dict[str, OutputFormat] = {
    PARQUET: OutputFormat(
        ".parquet", _parquet_bytes, lambda fh, columns=None: read_parquet(fh, columns),
        lambda fh: pq.read_table(fh, columns=["row_key"]).column("row_key").to_pylist(),
        lambda fh: pq.read_metadata(fh).num_rows),  # the footer only
    WEBDATASET: OutputFormat(".tar", output_tar, read_tar, _tar_row_keys, _tar_rows),  # the json members only
}


def output_format(name: str) -> OutputFormat:
    if name not in OUTPUT_FORMATS:
        raise ValueError(f"unknown output format {name!r}: use one of {', '.join(OUTPUT_FORMATS)}")
    return OUTPUT_FORMATS[name]


def format_of(path: str) -> OutputFormat:
    """The format of a committed file, from its extension."""
    for fmt in OUTPUT_FORMATS.values():
        if path.endswith(fmt.extension):
            return fmt
    known = ", ".join(f.extension for f in OUTPUT_FORMATS.values())
    raise ValueError(f"{path} is not an output file (extensions: {known})")


# ------------------------------------------------------------------------------------- committed output files
# Output lives under <out>/data/<shard>/, one folder per input shard (its name URL-quoted), so resuming a shard
# reads only that shard's committed row keys, however large the run. Every file is written in one piece
# (object stores replace objects atomically; locally via a rename), so a file that exists is committed.
# The readers take the files of every format (a run's own are of one: rag4dmc.pipeline.job.runner refuses to mix them).
DATA_DIR = "data"


def shard_dir(out: str, shard_name: str) -> str:
    """The folder holding the committed output rows of input shard ``shard_name``."""
    return f"{out.rstrip('/')}/{DATA_DIR}/{quote(shard_name, safe='')}"


def _files(storage, folder_glob: str) -> list[str]:
    return sorted(f for fmt in OUTPUT_FORMATS.values() for f in storage.glob(f"{folder_glob}/*{fmt.extension}"))


def output_files(storage, out: str) -> list[str]:
    """Every committed output file of the run in ``out``."""
    return _files(storage, f"{out.rstrip('/')}/{DATA_DIR}/*")


def shard_files(storage, out: str, shard_name: str) -> list[str]:
    """The committed output files of input shard ``shard_name``."""
    return _files(storage, shard_dir(out, shard_name))


def read_file(storage, path: str, columns: list[str] | None = None) -> pa.Table:
    """One committed file's rows (``OUTPUT_SCHEMA``, or ``columns`` of it)."""
    with storage.open(path) as fh:
        return format_of(path).read(fh, columns)


def file_row_keys(storage, path: str) -> list[str]:
    """The row keys of one committed file."""
    with storage.open(path) as fh:
        return format_of(path).row_keys(fh)


def write_file(storage, table: pa.Table, path: str) -> None:
    """Commit ``table`` at ``path`` in the format of its extension, in one piece: locally through a temporary
    file renamed into place, on object storage as one object."""
    from fsspec.implementations.local import LocalFileSystem

    payload = format_of(path).encode(table)
    fs, p = storage.locate(path)
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{p}.{uuid.uuid4().hex[:8]}.tmp"  # unique: two writers of one name never share a temp file
        fs.pipe_file(tmp, payload)
        fs.mv(tmp, p)
    else:
        fs.pipe_file(p, payload)


def committed_keys(storage, out: str, shard_name: str) -> set[str]:
    """The row keys of input shard ``shard_name`` already committed under ``out`` (a resume skips them; the rule:
    ``rag4dmc.pipeline.job.reader.committed_keys``)."""
    return keys_in(shard_files(storage, out, shard_name), lambda f: file_row_keys(storage, f), shard_name)


def count_output_rows(storage, out: str) -> int:
    """Committed output rows, from the parquet footers or the tars' json members (no image read)."""
    rows = 0
    for f in output_files(storage, out):
        with storage.open(f) as fh:
            rows += format_of(f).num_rows(fh)
    return rows


def read_output(storage, out: str, columns: list[str] | None = None) -> pa.Table:
    """Every committed output row of the run in ``out``."""
    files = output_files(storage, out)
    if not files:
        return pa.table({c: [] for c in (columns or ["row_key"])})
    return pa.concat_tables([read_file(storage, f, columns) for f in files], promote_options="default")


def file_name(row_keys: list[str], output_format_name: str = PARQUET) -> str:
    """A committed file's name, fixed by the rows it holds: a retried write task rewrites the same file."""
    digest = hashlib.sha1("\n".join(row_keys).encode()).hexdigest()[:20]
    return f"{digest}{output_format(output_format_name).extension}"


class OutputSink(Datasink):
    """Ray Data sink of the job's output rows: each block's rows of each input shard become one file (parquet,
    or a WebDataset tar) in that shard's folder, written in one piece, as soon as the block reaches the sink."""

    def __init__(self, out: str, storage_cfg, flow=None, output_format_name: str = PARQUET):
        self.out, self.storage_cfg, self.flow = out.rstrip("/"), storage_cfg, flow
        output_format(output_format_name)  # an unknown format fails here, on the driver, not in a write task
        self.output_format = output_format_name

    def get_name(self) -> str:
        return "CommitOutput"

    def write(self, blocks, ctx) -> int:
        from rag4dmc.pipeline.io.storage import Storage

        storage = Storage(self.storage_cfg)
        written = 0
        for block in blocks:
            table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block)
            if not table.num_rows:
                continue
            shards = table.column("source_shard").to_pylist()
            for name in dict.fromkeys(shards):
                part = table.filter(pa.array([s == name for s in shards]))
                keys = part.column("row_key").to_pylist()
                write_file(storage, part, f"{shard_dir(self.out, name)}/{file_name(keys, self.output_format)}")
                written += part.num_rows
            if self.flow is not None:  # committed: room for the reads again
                self.flow.release.remote(table.num_rows)
            faults.inject("commit", table.column("row_key").to_pylist())  # a testing aid; nothing when off
        return written
