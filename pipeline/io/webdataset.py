"""WebDataset tars in img2dataset's layout, read and written in one place: the input shards of both commands
(``rag4dmc.pipeline.io.datasets``) and the completion job's tar output (``rag4dmc.pipeline.job.writer``).

A sample is the members sharing a key: ``<key>.jpg|png|webp`` (the image), ``<key>.txt`` (the text) and
``<key>.json`` (metadata); the key is the member's path up to the first dot of its file name.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # img2dataset's image members
TEXT_EXTENSION = "txt"
META_EXTENSION = "json"
TAR_BLOCK = tarfile.BLOCKSIZE
_IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpg"), (b"GIF8", "gif"))


def image_extension(data: bytes, default: str = "jpg") -> str:
    """The file extension of encoded image bytes (png, jpg, webp, gif), from their magic number."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((ext for magic, ext in _IMAGE_MAGIC if data.startswith(magic)), default)


def split_member(name: str) -> tuple[str, str]:
    """WebDataset naming: the key is the path up to the first dot of the file name, the rest the extension."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def tar_bytes(samples: Iterable[tuple[str, list[tuple[str, bytes]]]]) -> bytes:
    """One tar of ``(key, [(extension, payload), ...])`` samples, members in order. Deterministic (PAX, mtime 0):
    the same samples always give the same bytes, so a rewrite of the same rows is the same file."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, members in samples:
            for ext, payload in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def iter_members(fh, wanted: Callable[[str], bool] = lambda ext: True) -> Iterator[tuple[str, str, bytes]]:
    """(key, extension, payload) of a well-formed tar's file members, in order, streamed from ``fh``; only the data
    of ``wanted`` extensions is read (a tar rag4dmc wrote: its json members without its images, say)."""
    with tarfile.open(fileobj=fh, mode="r:") as tar:
        for member in tar:
            if member.isfile():
                key, ext = split_member(member.name)
                if wanted(ext):
                    yield key, ext, tar.extractfile(member).read()


@dataclass
class ParsedTar:
    """What :func:`parse_tar` read: members grouped by key, the corrupt regions it skipped, and the keys of the
    samples that bordered one (the lost bytes may have been theirs)."""

    samples: dict[str, dict[str, bytes]] = field(default_factory=dict)  # key -> extension -> payload
    errors: list[str] = field(default_factory=list)
    suspects: set[str] = field(default_factory=set)


def _nonzero(data: bytes, start: int, end: int) -> bool:
    return data[start:end].strip(b"\0") != b""


def parse_tar(data: bytes, name: str) -> ParsedTar:
    """Every readable member of a tar that may be damaged (an input shard nobody checked), grouped by key.

    A member whose header or data is corrupt is reported and skipped; reading resumes at the next readable
    header. The samples bordering a skipped region are marked suspect."""
    out = ParsedTar()
    expected, previous = 0, None  # where the next header should start; the key of the last member
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:", ignore_zeros=True) as tar:
        while True:
            try:
                member = tar.next()
            except (tarfile.TarError, OSError, EOFError) as exc:
                out.errors.append(f"corrupt tar member in {name} at byte {expected}: {exc}; the rest is unreadable")
                out.suspects.update(k for k in (previous,) if k)
                expected = len(data)
                break
            if member is None:
                break
            key, ext = split_member(member.name)
            if member.offset > expected and _nonzero(data, expected, member.offset):
                out.errors.append(f"corrupt tar member in {name}: unreadable bytes {expected}-{member.offset} skipped")
                out.suspects.update(k for k in (previous, key) if k)
            if member.offset_data + member.size > len(data):
                out.errors.append(f"corrupt tar member {member.name} in {name}: truncated after "
                                  f"{len(data) - member.offset_data} of {member.size} bytes; the rest is lost")
                out.suspects.add(key)
                expected = len(data)
                break
            expected = member.offset_data + -(-member.size // TAR_BLOCK) * TAR_BLOCK
            previous = key
            if not member.isfile():
                continue
            try:
                payload = tar.extractfile(member).read()
            except (tarfile.TarError, OSError, EOFError) as exc:
                out.errors.append(f"corrupt tar member {member.name} in {name}: {exc}")
                out.suspects.add(key)
                continue
            sample = out.samples.setdefault(key, {})
            if ext in IMAGE_EXTENSIONS:
                sample.setdefault(ext, payload)  # a repeated image member: the first one is the sample's
            else:
                sample[ext] = payload
    if expected < len(data) and _nonzero(data, expected, len(data)):
        out.errors.append(f"corrupt tar member in {name}: unreadable bytes {expected}-{len(data)} at the end")
        out.suspects.update(k for k in (previous,) if k)
    return out
