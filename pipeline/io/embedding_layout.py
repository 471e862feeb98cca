"""The clip-retrieval embedding layout: precomputed CLIP embeddings of a corpus, read and written in pieces.

``clip-retrieval inference`` (and rom1504/embedding-reader) lay a corpus's embeddings out as::

    DIR/img_emb/img_emb_{N}.npy          float16 or float32, shape [rows_N, d_img]
    DIR/text_emb/text_emb_{N}.npy        float16 or float32, shape [rows_N, d_txt]
    DIR/metadata/metadata_{N}.parquet    rows aligned by position with both .npy files

``N`` is a shard number, written as it appears in the file names (``0``, ``00012``: padding is kept).
The metadata has a text column (``caption``, else ``text``), an image column (``url``, else
``image_path``, else ``image_uri``; optional) and maybe an id (``key`` from img2dataset, else ``id``);
other columns are ignored. ``DIR`` is a local folder or an fsspec URI such as ``s3://bucket/prefix``.

Nothing is read whole. Listing a layout reads each .npy's header (one ranged read of its first
:data:`HEADER_PROBE_BYTES`) and each parquet's footer; vectors are read as byte ranges at
``header_len + row * dim * itemsize`` (as embedding-reader's numpy reader does), and metadata as the
needed columns of the row groups that hold the needed rows. Reads retry transient storage errors
(:func:`rag4dmc.pipeline.io.datasets.with_retries`).

The writer writes a shard's two .npy files first and its metadata parquet last: a shard whose metadata
exists is complete (:func:`written_numbers`, for resuming), and a shard without it is rewritten.

Canonical metadata (:func:`read_metadata`): ``id`` (``key``, else ``id``, else ``"{N}:{row}"``, also for
a null key), ``text`` (null when null, empty or whitespace-only), ``image_uri`` (null when absent; a
relative ``image_path`` is resolved against ``DIR``, the folder holding ``metadata/``, while ``url``
values are kept as they are) and ``row`` (the row number within the shard).
"""

from __future__ import annotations

import io
import re
import struct
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from rag4dmc.pipeline.io.datasets import NOT_TRANSIENT, with_retries
from rag4dmc.pipeline.io.storage import url_to_fs

IMAGE_DIR, TEXT_DIR, METADATA_DIR = "img_emb", "text_emb", "metadata"
FILE_PATTERNS = {
    "image": re.compile(r"^img_emb_(\d+)\.npy$"),
    "text": re.compile(r"^text_emb_(\d+)\.npy$"),
    "metadata": re.compile(r"^metadata_(\d+)\.parquet$"),
}
FOLDERS = {"image": IMAGE_DIR, "text": TEXT_DIR, "metadata": METADATA_DIR}
DTYPES = ("float16", "float32")
MODALITIES = ("image", "text")
TEXT_COLUMNS = ("caption", "text")
IMAGE_COLUMNS = ("url", "image_path", "image_uri")
RESOLVED_IMAGE_COLUMNS = ("image_path",)  # relative values are paths under DIR; a url is kept as written
ID_COLUMNS = ("key", "id")
METADATA_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("image_uri", pa.string()),
                             ("row", pa.int64())])

HEADER_PROBE_BYTES = 4096  # one ranged read holds a .npy header (numpy writes 128 bytes; longer ones are re-read)
COALESCE_GAP_ROWS = 64  # read_rows reads ids of a shard this close together as one range
MAX_RANGE_BYTES = 64 * 2**20  # ... and splits a range longer than this
IO_WORKERS = 16  # concurrent header/footer/range reads (object stores reward parallel requests)
MAX_LISTED_PROBLEMS = 5


class LayoutError(ValueError):
    """An embedding layout that cannot be read as clip-retrieval's: what is wrong, where, and what to do."""


@dataclass(frozen=True)
class EmbeddingShard:
    """One shard N of a layout: its three files (URIs under the root as given) and what their headers say."""

    number: str
    image: str
    text: str
    metadata: str
    rows: int
    image_dim: int
    text_dim: int
    image_dtype: str
    text_dtype: str


@dataclass(frozen=True)
class _NpyHeader:
    """What a .npy header says: rows, dim, element dtype and where the data starts."""

    rows: int
    dim: int
    dtype: np.dtype
    offset: int


def _join(root: str, *parts: str) -> str:
    """``root/part/...`` without doubled slashes."""
    return "/".join([root.rstrip("/"), *parts])


def _file_name(modality: str, number: str) -> str:
    """The layout's file name of shard ``number``'s ``modality`` ('image', 'text' or 'metadata')."""
    return {"image": f"img_emb_{number}.npy", "text": f"text_emb_{number}.npy",
            "metadata": f"metadata_{number}.parquet"}[modality]


def _relative(modality: str, number: str) -> str:
    """The file's path under the layout root, e.g. ``img_emb/img_emb_3.npy``."""
    return f"{FOLDERS[modality]}/{_file_name(modality, number)}"


def _parallel(fn: Callable, items: Sequence) -> list:
    """``[fn(x) for x in items]`` on a few threads (the first exception is raised, in item order)."""
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(IO_WORKERS, len(items))) as pool:
        return list(pool.map(fn, items))


def _listing(fs: fsspec.AbstractFileSystem, folder: str, pattern: re.Pattern) -> dict[str, int | None]:
    """Shard number -> file size of the files in ``folder`` matching ``pattern`` (empty if no folder)."""
    fs.invalidate_cache(folder)  # another process may have written since this filesystem last listed
    try:
        entries = with_retries(lambda: fs.ls(folder, detail=True))
    except (FileNotFoundError, NotADirectoryError):
        return {}
    found = {}
    for entry in entries:
        match = pattern.match(entry["name"].rstrip("/").rsplit("/", 1)[-1])
        if match and entry.get("type", "file") != "directory":  # files, and links to them
            found[match.group(1)] = entry.get("size")
    return found


_NPY_FIELDS = {"descr": re.compile(r"'descr'\s*:\s*'([^']*)'"),
               "fortran_order": re.compile(r"'fortran_order'\s*:\s*(True|False)"),
               "shape": re.compile(r"'shape'\s*:\s*\(([\d\s,]*)\)")}


def npy_header_fields(text: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of a .npy header's dict literal, read without Python's ``ast``.

    numpy's own reader (``ast.literal_eval``) builds an AST, and building ASTs in two threads at once can raise
    ``SystemError: AST constructor recursion depth mismatch`` on Python 3.11 before 3.11.8 (CPython gh-106905):
    the layout reads its shards' headers on a thread pool. This reads the three keys numpy.save writes; any other
    header (structured dtypes, other keys) is refused."""
    body = text.strip()
    if not (body.startswith("{") and body.endswith("}")) or body.count(":") != 3:
        raise ValueError(f"not a .npy header of the three keys numpy.save writes: {body[:120]!r}")
    found = {key: pattern.search(body) for key, pattern in _NPY_FIELDS.items()}
    missing = [key for key, match in found.items() if match is None]
    if missing:
        raise ValueError(f"the .npy header has no plain {', '.join(missing)}: {body[:120]!r}")
    shape = tuple(int(x) for x in found["shape"].group(1).split(",") if x.strip())
    return shape, found["fortran_order"].group(1) == "True", np.dtype(found["descr"].group(1))


def _parse_npy_header(head: bytes, uri: str) -> tuple[_NpyHeader, int]:
    """(header, bytes it needs) from the first bytes of a .npy; needed > len(head) means read more."""
    buf = io.BytesIO(head)
    try:
        version = np.lib.format.read_magic(buf)
    except ValueError as exc:
        raise LayoutError(f"{uri} is not a .npy file ({exc}): write embeddings with numpy.save") from None
    if version not in ((1, 0), (2, 0), (3, 0)):
        raise LayoutError(f"{uri} is .npy format version {version[0]}.{version[1]}, which this reader does not "
                          f"know: rewrite it with numpy.save")
    length_format, prefix = ("<H", 10) if version == (1, 0) else ("<I", 12)
    if len(head) < prefix:
        return _NpyHeader(0, 0, np.dtype("float32"), 0), prefix
    needed = prefix + struct.unpack(length_format, head[prefix - struct.calcsize(length_format):prefix])[0]
    if len(head) < needed:
        return _NpyHeader(0, 0, np.dtype("float32"), 0), needed
    try:
        shape, fortran_order, dtype = npy_header_fields(head[prefix:needed].decode(
            "utf8" if version == (3, 0) else "latin1"))
    except (ValueError, TypeError) as exc:
        raise LayoutError(f"{uri} has an unreadable .npy header ({exc}): rewrite it with numpy.save") from None
    if len(shape) != 2:
        raise LayoutError(f"{uri} holds an array of shape {shape}; embeddings must be 2-d [rows, dim]: "
                          f"reshape before saving")
    if dtype.name not in DTYPES:
        raise LayoutError(f"{uri} holds {dtype.name} values; embeddings must be float16 or float32: "
                          f"save them as one of those")
    if fortran_order and min(shape) > 1:
        raise LayoutError(f"{uri} is stored in Fortran (column) order, so its rows are not contiguous: "
                          f"save numpy.ascontiguousarray(array) instead")
    return _NpyHeader(int(shape[0]), int(shape[1]), dtype, needed), needed  # the data follows the header


def _npy_header(fs: fsspec.AbstractFileSystem, path: str, uri: str, size: int | None = None) -> _NpyHeader:
    """The header of the .npy at ``path`` from one ranged read (two for long headers); checks its size if known."""
    if size == 0:
        raise LayoutError(f"{uri} is empty: rewrite the shard")
    head = with_retries(lambda: fs.cat_file(path, start=0, end=HEADER_PROBE_BYTES))
    header, needed = _parse_npy_header(head, uri)
    if needed > len(head):
        head = with_retries(lambda: fs.cat_file(path, start=0, end=needed))
        header, needed = _parse_npy_header(head, uri)
        if needed > len(head):
            raise LayoutError(f"{uri} ends inside its .npy header: the file is truncated; rewrite the shard")
    expected = header.offset + header.rows * header.dim * header.dtype.itemsize
    if size is not None and size < expected:
        raise LayoutError(f"{uri} is truncated: its header promises {header.rows} x {header.dim} "
                          f"{header.dtype.name} ({expected} bytes) but the file has {size} bytes; rewrite the shard")
    return header


def _read_range(fs: fsspec.AbstractFileSystem, path: str, uri: str, header: _NpyHeader,
                start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) as float32, from one ranged read."""
    row_bytes = header.dim * header.dtype.itemsize
    if stop <= start or row_bytes == 0:
        return np.empty((max(stop - start, 0), header.dim), np.float32)
    begin, length = header.offset + start * row_bytes, (stop - start) * row_bytes
    data = with_retries(lambda: fs.cat_file(path, start=begin, end=begin + length))
    if len(data) != length:
        raise LayoutError(f"{uri} is truncated: rows [{start}, {stop}) need bytes [{begin}, {begin + length}) "
                          f"but the read returned {len(data)} bytes; rewrite the shard")
    return np.frombuffer(data, dtype=header.dtype).reshape(stop - start, header.dim).astype(np.float32)


def _parquet_footer(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> tuple[int, list[str]]:
    """(row count, column names) of a parquet file from its footer."""
    def read() -> tuple[int, list[str]]:
        with fs.open(path, "rb", cache_type="none") as f:
            parquet = pq.ParquetFile(f)
            return parquet.metadata.num_rows, list(parquet.schema_arrow.names)
    try:
        return with_retries(read)
    except pa.ArrowInvalid as exc:
        raise LayoutError(f"{uri} is not a readable parquet file ({exc}): rewrite the shard's metadata") from None


def _pick(columns: Iterable[str], candidates: Sequence[str]) -> str | None:
    """The first of ``candidates`` among ``columns``."""
    present = set(columns)
    return next((c for c in candidates if c in present), None)


def _text_column(columns: list[str], uri: str) -> str:
    """The metadata's text column, or a LayoutError naming the file and its columns."""
    column = _pick(columns, TEXT_COLUMNS)
    if column is None:
        raise LayoutError(f"{uri} has no text column ({' or '.join(TEXT_COLUMNS)}); its columns are "
                          f"{columns}: rename the caption column to 'caption'")
    return column


def _missing_partners(found: dict[str, dict[str, int | None]]) -> list[str]:
    """One line per shard number that lacks one or two of its three files."""
    numbers = sorted(set().union(*found.values()), key=lambda n: (int(n), n))
    problems = []
    for number in numbers:
        missing = [_relative(m, number) for m in found if number not in found[m]]
        if missing:
            present = [_relative(m, number) for m in found if number in found[m]]
            problems.append(f"shard {number} has {' and '.join(present)} but lacks {' and '.join(missing)}")
    return problems


def _inspect(fs: fsspec.AbstractFileSystem, root: str, path: str, number: str,
             sizes: dict[str, int | None]) -> EmbeddingShard:
    """Shard ``number`` from its two .npy headers and its parquet footer, checked for agreement."""
    uris = {m: _join(root, _relative(m, number)) for m in FOLDERS}
    paths = {m: _join(path, _relative(m, number)) for m in FOLDERS}
    image = _npy_header(fs, paths["image"], uris["image"], sizes["image"])
    text = _npy_header(fs, paths["text"], uris["text"], sizes["text"])
    rows, columns = _parquet_footer(fs, paths["metadata"], uris["metadata"])
    if not image.rows == text.rows == rows:
        raise LayoutError(f"shard {number} is misaligned: {_relative('image', number)} has {image.rows} rows, "
                          f"{_relative('text', number)} has {text.rows}, {_relative('metadata', number)} has "
                          f"{rows}; the three files must hold the same rows in the same order: regenerate the shard")
    _text_column(columns, uris["metadata"])
    return EmbeddingShard(number=number, image=uris["image"], text=uris["text"], metadata=uris["metadata"],
                          rows=rows, image_dim=image.dim, text_dim=text.dim,
                          image_dtype=image.dtype.name, text_dtype=text.dtype.name)


def _check_consistent_dims(shards: list[EmbeddingShard]) -> None:
    """LayoutError when a shard's image or text dim differs from the first shard's."""
    first = shards[0]
    for shard in shards[1:]:
        for modality in MODALITIES:
            got, want = getattr(shard, f"{modality}_dim"), getattr(first, f"{modality}_dim")
            if got != want:
                raise LayoutError(f"shard {shard.number} has {got}-d {modality} embeddings "
                                  f"({getattr(shard, modality)}) but shard {first.number} has {want}-d: "
                                  f"one layout must come from one encoder; remove or re-embed the odd shards")


def list_embedding_shards(root: str, storage_options: dict | None = None) -> list[EmbeddingShard]:
    """Shards paired by number, sorted by int(N); reads headers and footers only."""
    fs, path = url_to_fs(root, storage_options)
    path = path.rstrip("/")
    found = {m: _listing(fs, _join(path, FOLDERS[m]), FILE_PATTERNS[m]) for m in FOLDERS}
    if not found["image"]:
        raise LayoutError(f"no {IMAGE_DIR}/img_emb_N.npy files under {root}: expected clip-retrieval's inference "
                          f"layout ({IMAGE_DIR}/, {TEXT_DIR}/, {METADATA_DIR}/ with one file per shard N); "
                          f"check the path")
    problems = _missing_partners(found)
    if problems:
        more = f" (and {len(problems) - MAX_LISTED_PROBLEMS} more)" if len(problems) > MAX_LISTED_PROBLEMS else ""
        raise LayoutError(f"incomplete shards under {root}: {'; '.join(problems[:MAX_LISTED_PROBLEMS])}{more}. "
                          f"Every shard needs all three files: restore or regenerate the missing ones, or remove the "
                          f"strays (an interrupted writer leaves .npy files without metadata; rerun it to finish)")
    numbers = sorted(found["image"], key=lambda n: (int(n), n))
    shards = _parallel(lambda n: _inspect(fs, root.rstrip("/"), path, n, {m: found[m][n] for m in FOLDERS}),
                       numbers)
    _check_consistent_dims(shards)
    return shards


def read_vectors(uri: str, start: int, stop: int, storage_options: dict | None = None) -> np.ndarray:
    """Rows [start, stop) of one .npy as float32, with one ranged read (after one of its header)."""
    fs, path = url_to_fs(uri, storage_options)
    header = _npy_header(fs, path, uri)
    if not 0 <= start <= stop <= header.rows:
        raise ValueError(f"rows [{start}, {stop}) are outside {uri}, which has {header.rows} rows")
    return _read_range(fs, path, uri, header, start, stop)


def _canonical_ids(table: pa.Table, column: str | None, number: str, rows: pa.Array) -> pa.Array:
    """``key``/``id`` as strings, with ``"{N}:{row}"`` for rows that have none."""
    derived = pc.binary_join_element_wise(pa.scalar(number), pc.cast(rows, pa.string()), ":")
    if column is None:
        return derived
    return pc.coalesce(pc.cast(table[column].combine_chunks(), pa.string()), derived)


def _blank_to_null(values: pa.Array) -> pa.Array:
    """Strings with empty or whitespace-only values made null."""
    return pc.if_else(pc.equal(pc.utf8_trim_whitespace(values), ""), pa.scalar(None, pa.string()), values)


def _canonical_images(table: pa.Table, column: str | None, root: str) -> pa.Array:
    """Image URIs as strings (null when absent); a relative ``image_path`` is resolved against ``root``."""
    if column is None:
        return pa.nulls(table.num_rows, pa.string())
    values = _blank_to_null(pc.utf8_trim_whitespace(pc.cast(table[column].combine_chunks(), pa.string())))
    if column not in RESOLVED_IMAGE_COLUMNS:
        return values
    absolute = pc.or_(pc.match_substring(values, "://"), pc.starts_with(values, "/"))
    return pc.if_else(absolute, values, pc.binary_join_element_wise(pa.scalar(root.rstrip("/")), values, "/"))


def _row_groups(parquet: pq.ParquetFile, start: int, stop: int) -> tuple[list[int], int]:
    """The row groups holding rows [start, stop) and the first row of the first of them."""
    groups, first_row, offset = [], None, 0
    for i in range(parquet.metadata.num_row_groups):
        n = parquet.metadata.row_group(i).num_rows
        if offset < stop and offset + n > start:
            groups.append(i)
            first_row = offset if first_row is None else first_row
        offset += n
    return groups, (first_row or 0)


def _take_rows(parquet: pq.ParquetFile, rows: np.ndarray, columns: list[str]) -> pa.Table:
    """``rows`` (local, any order) of a parquet file, reading only the row groups that hold them."""
    sizes = np.array([parquet.metadata.row_group(i).num_rows for i in range(parquet.metadata.num_row_groups)],
                     np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    group_of = np.searchsorted(starts, rows, side="right") - 1
    groups = np.unique(group_of)
    at = dict(zip(groups.tolist(), np.concatenate([[0], np.cumsum(sizes[groups])])[:-1].tolist()))
    table = parquet.read_row_groups(groups.tolist(), columns=columns)
    return table.take(pa.array(rows - starts[group_of] + np.array([at[g] for g in group_of.tolist()], np.int64)))


def read_metadata(shard: EmbeddingShard, storage_options: dict | None = None, start: int = 0,
                  stop: int | None = None, extra: pa.Schema | None = None, rows: np.ndarray | None = None) -> pa.Table:
    """Canonical metadata (id, text, image_uri, row) of rows [start, stop), from the needed columns and row groups.

    ``extra``: more columns passed through after the canonical ones, cast to their type (nulls where absent).
    ``rows``: these local rows instead (in their order), from the row groups that hold them only (a sample's
    texts without reading the whole shard's metadata)."""
    stop = shard.rows if stop is None else stop
    if not 0 <= start <= stop <= shard.rows:
        raise ValueError(f"rows [{start}, {stop}) are outside shard {shard.number}, which has {shard.rows} rows")
    if rows is not None:
        rows = np.asarray(rows, np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= shard.rows):
            raise ValueError(f"row {int(rows.max() if rows.max() >= shard.rows else rows.min())} is outside shard "
                             f"{shard.number}, which has {shard.rows} rows")
    fs, path = url_to_fs(shard.metadata, storage_options)

    def read() -> tuple[pa.Table, list[str], int]:
        with fs.open(path, "rb", cache_type="none") as f:
            parquet = pq.ParquetFile(f)
            names = list(parquet.schema_arrow.names)
            wanted = [c for c in (_text_column(names, shard.metadata), _pick(names, IMAGE_COLUMNS),
                                  _pick(names, ID_COLUMNS)) if c]
            wanted += [f.name for f in (extra or []) if f.name in names and f.name not in wanted]
            if rows is not None:
                table = _take_rows(parquet, rows, wanted) if rows.size else \
                    parquet.schema_arrow.empty_table().select(wanted)
                return table, names, parquet.metadata.num_rows
            groups, first_row = _row_groups(parquet, start, stop)
            table = parquet.read_row_groups(groups, columns=wanted) if groups else \
                parquet.schema_arrow.empty_table().select(wanted)
            return table.slice(start - first_row, stop - start), names, parquet.metadata.num_rows
    try:
        table, names, file_rows = with_retries(read)
    except pa.ArrowInvalid as exc:
        raise LayoutError(f"{shard.metadata} is not a readable parquet file ({exc}): rewrite the shard's "
                          f"metadata") from None
    if file_rows != shard.rows:
        raise LayoutError(f"{shard.metadata} now has {file_rows} rows, but shard {shard.number} was listed with "
                          f"{shard.rows}: the layout changed since it was listed; list it again")
    row = pa.array(np.arange(start, stop, dtype=np.int64) if rows is None else rows)
    root = shard.metadata.rsplit("/", 2)[0] if shard.metadata.count("/") >= 2 else "."
    text = _blank_to_null(pc.cast(table[_text_column(names, shard.metadata)].combine_chunks(), pa.string()))
    out = pa.Table.from_arrays([_canonical_ids(table, _pick(names, ID_COLUMNS), shard.number, row), text,
                                _canonical_images(table, _pick(names, IMAGE_COLUMNS), root), row],
                               schema=METADATA_SCHEMA)
    for f in extra or []:
        col = table[f.name].combine_chunks().cast(f.type) if f.name in names else pa.nulls(out.num_rows, f.type)
        out = out.append_column(f, col)
    return out


def check_dims(shards: list[EmbeddingShard], image_dim: int, text_dim: int, what: str) -> None:
    """LayoutError when the shards' dims differ from the encoder's, naming both."""
    for shard in shards:
        for modality, want in (("image", image_dim), ("text", text_dim)):
            got = getattr(shard, f"{modality}_dim")
            if got != want:
                raise LayoutError(f"{what} have {got}-d {modality} embeddings (shard {shard.number}: "
                                  f"{getattr(shard, modality)}), the KB's encoder makes {want}-d: use embeddings "
                                  f"made by the same CLIP model as the KB, or build the KB with that model")


def total_rows(shards: Sequence[EmbeddingShard]) -> int:
    """Rows in all the shards."""
    return int(sum(s.rows for s in shards))


def shard_offsets(shards: Sequence[EmbeddingShard]) -> np.ndarray:
    """Cumulative row offsets (int64, len(shards) + 1): shard i holds global rows [offsets[i], offsets[i+1])."""
    return np.concatenate([[0], np.cumsum([s.rows for s in shards], dtype=np.int64)]).astype(np.int64)


def _runs(local: np.ndarray, max_gap: int, max_rows: int) -> list[tuple[int, int]]:
    """[start, stop) ranges covering sorted unique rows ``local``: rows at most ``max_gap`` apart share a range."""
    if local.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(local) > max_gap) + 1
    runs = []
    for chunk in np.split(local, breaks):
        begin = int(chunk[0])
        while begin <= chunk[-1]:  # split a long dense run so one read stays bounded
            stop = min(int(chunk[-1]) + 1, begin + max_rows)
            runs.append((begin, stop))
            later = chunk[chunk >= stop]
            begin = int(later[0]) if later.size else stop
    return runs


def read_rows(shards: Sequence[EmbeddingShard], offsets: np.ndarray, global_ids: np.ndarray, modality: str,
              storage_options: dict | None = None, max_gap: int = COALESCE_GAP_ROWS) -> np.ndarray:
    """float32 vectors of global row ids in the given order, from coalesced ranged reads per shard."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
    ids = np.asarray(global_ids, dtype=np.int64).reshape(-1)
    offsets = np.asarray(offsets, dtype=np.int64)
    if len(offsets) != len(shards) + 1:
        raise ValueError(f"offsets has {len(offsets)} entries for {len(shards)} shards: use shard_offsets(shards)")
    dim = getattr(shards[0], f"{modality}_dim") if shards else 0
    out = np.empty((ids.size, dim), np.float32)
    if ids.size == 0:
        return out
    bad = ids[(ids < 0) | (ids >= offsets[-1])]
    if bad.size:
        raise ValueError(f"global row id {int(bad[0])} is outside the layout's {int(offsets[-1])} rows")
    owner = np.searchsorted(offsets, ids, side="right") - 1
    touched = np.unique(owner)
    fs, _ = url_to_fs(getattr(shards[0], modality), storage_options)

    def header(s: int) -> tuple[str, _NpyHeader]:
        uri = getattr(shards[s], modality)
        path = url_to_fs(uri, storage_options)[1]
        found = _npy_header(fs, path, uri)
        if (found.rows, found.dim) != (shards[s].rows, dim):
            raise LayoutError(f"{uri} now holds {found.rows} x {found.dim}, but shard {shards[s].number} was "
                              f"listed as {shards[s].rows} x {dim}: the layout changed; list it again")
        return path, found

    headers = dict(zip(touched.tolist(), _parallel(header, touched.tolist())))
    tasks = []
    for s in touched.tolist():
        positions = np.flatnonzero(owner == s)
        local = ids[positions] - offsets[s]
        row_bytes = max(dim * headers[s][1].dtype.itemsize, 1)
        for begin, stop in _runs(np.unique(local), max_gap, max(MAX_RANGE_BYTES // row_bytes, 1)):
            inside = (local >= begin) & (local < stop)
            tasks.append((s, begin, stop, positions[inside], local[inside]))

    def fill(task: tuple) -> None:
        s, begin, stop, positions, local = task
        path, found = headers[s]
        out[positions] = _read_range(fs, path, getattr(shards[s], modality), found, begin, stop)[local - begin]

    _parallel(fill, tasks)
    return out


def _write_npy(fs: fsspec.AbstractFileSystem, path: str, array: np.ndarray) -> None:
    """Stream ``array`` to ``path`` as .npy (a retry starts the file over)."""
    def write() -> None:
        with fs.open(path, "wb") as f:
            np.lib.format.write_array(f, array, allow_pickle=False)
    with_retries(write)


def _write_parquet(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table) -> None:
    """Write ``table`` in one piece: to a unique temp name and renamed locally, one put to object storage."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        fs.pipe_file(tmp, buf.getvalue())
        fs.mv(tmp, path)
    else:
        with_retries(lambda: fs.pipe_file(path, buf.getvalue()))


def _as_embeddings(array: np.ndarray, dtype: str, what: str) -> np.ndarray:
    """``array`` as a C-contiguous 2-d ``dtype`` array, refusing values the dtype cannot hold."""
    array = np.asarray(array)
    if array.ndim != 2:
        raise LayoutError(f"{what} embeddings must be 2-d [rows, dim], got shape {array.shape}")
    with np.errstate(over="ignore"):
        converted = np.ascontiguousarray(array, dtype=dtype)
    if np.any(np.isinf(converted) & np.isfinite(array)):
        raise LayoutError(f"{what} embeddings hold values beyond {dtype}'s range: write with dtype='float32'")
    return converted


def write_embedding_shard(root: str, number: str, image: np.ndarray, text: np.ndarray, metadata: pa.Table,
                          storage_options: dict | None = None, dtype: str = "float16") -> EmbeddingShard:
    """Write shard N: its two .npy files (in ``dtype``), then its metadata parquet, whose presence marks it complete."""
    if not re.fullmatch(r"\d+", str(number)):
        raise ValueError(f"shard number must be digits (e.g. '0' or '00012'), got {number!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    image, text = _as_embeddings(image, dtype, "image"), _as_embeddings(text, dtype, "text")
    if not image.shape[0] == text.shape[0] == metadata.num_rows:
        raise LayoutError(f"shard {number} is misaligned: {image.shape[0]} image rows, {text.shape[0]} text rows, "
                          f"{metadata.num_rows} metadata rows; pass the same rows in the same order")
    _text_column(list(metadata.column_names), f"the metadata of shard {number}")
    fs, path = url_to_fs(root, storage_options)
    path = path.rstrip("/")
    paths = {m: _join(path, _relative(m, number)) for m in FOLDERS}
    if isinstance(fs, LocalFileSystem):
        for folder in FOLDERS.values():
            fs.makedirs(_join(path, folder), exist_ok=True)
    if fs.exists(paths["metadata"]):  # overwriting: the shard is incomplete until its new metadata lands
        fs.rm(paths["metadata"])
    _write_npy(fs, paths["image"], image)
    _write_npy(fs, paths["text"], text)
    _write_parquet(fs, paths["metadata"], metadata)
    return EmbeddingShard(number=str(number), image=_join(root, _relative("image", number)),
                          text=_join(root, _relative("text", number)),
                          metadata=_join(root, _relative("metadata", number)), rows=metadata.num_rows,
                          image_dim=image.shape[1], text_dim=text.shape[1], image_dtype=dtype, text_dtype=dtype)


def remove_incomplete(root: str, storage_options: dict | None = None) -> list[str]:
    """Delete the .npy files of shards whose metadata was never written (an interrupted write); their paths."""
    fs, path = url_to_fs(root, storage_options)
    done = written_numbers(root, storage_options)
    removed = []
    for modality in MODALITIES:
        folder = f"{path}/{FOLDERS[modality]}"
        if not fs.exists(folder):
            continue
        for number in _listing(fs, folder, FILE_PATTERNS[modality]):
            if number not in done:
                target = f"{folder}/{_file_name(modality, number)}"
                fs.rm(target)
                removed.append(target)
    return removed


def written_numbers(root: str, storage_options: dict | None = None) -> set[str]:
    """Numbers of the shards whose metadata parquet exists (complete shards); empty if ``root`` does not exist."""
    fs, path = url_to_fs(root, storage_options)
    try:
        return set(_listing(fs, _join(path.rstrip("/"), METADATA_DIR), FILE_PATTERNS["metadata"]))
    except NOT_TRANSIENT:
        return set()
