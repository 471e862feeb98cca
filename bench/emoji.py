"""A real image-text corpus that nobody on this project generated: Unicode's emoji, drawn by Noto Color Emoji.

Debian's ``unicode-data`` gives every emoji its CLDR name, group and subgroup in
``/usr/share/unicode/emoji/emoji-test.txt``; Debian's ``fonts-noto-color-emoji`` gives Google's artwork for
it. Each fully-qualified emoji becomes one pair: the drawing (an RGBA PNG on a transparent background, flat
colours and thick outlines: clip art, not photographs) and its name as the caption ("grinning face with big
eyes"), with the group ("Smileys & Emotion") and subgroup ("face-smiling") as labels. Skin-tone and gender
variants are separate rows: near-duplicate drawings with near-duplicate names, as real corpora have.

:func:`emoji_pairs` reads the corpus; :func:`split_corpus` makes the internal / external / incomplete
datasets the benchmarks and tests use (the external part mixes unseen emoji of the same groups, an
off-domain group and pairs with shuffled captions, the noise purification should drop).
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FONT_SIZE = 109  # Noto Color Emoji is a bitmap font with one strike: 109 px
CANVAS = (160, 160)  # room for the widest glyphs (flags, ZWJ sequences) before cropping
MISSING_HINT = "apt-get install fonts-noto-color-emoji unicode-data (make test installs them as root)"


class EmojiDataMissing(FileNotFoundError):
    """The Debian packages with the emoji list or artwork are not installed."""


@dataclass(frozen=True)
class Emoji:
    codepoints: str  # "1F600" or "1F44B 1F3FD"
    char: str
    name: str
    group: str
    subgroup: str


def parse_emoji_test(text: str) -> list[Emoji]:
    """The fully-qualified emoji of an ``emoji-test.txt``, in file order, with their group and subgroup."""
    out, group, subgroup = [], "", ""
    for line in text.splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#"):
            fields, _, comment = line.partition("#")
            codes, _, status = fields.partition(";")
            if status.strip() != "fully-qualified":
                continue
            char, _, rest = comment.strip().partition(" ")
            name = rest.split(" ", 1)[1] if rest.startswith("E") else rest  # "E1.0 grinning face"
            out.append(Emoji(codes.strip(), char, name.strip(), group, subgroup))
    return out


def _require(path: Path) -> Path:
    if not path.is_file():
        raise EmojiDataMissing(f"{path} is missing: {MISSING_HINT}")
    return path


@functools.lru_cache(maxsize=1)
def _font():
    from PIL import ImageFont

    return ImageFont.truetype(str(_require(EMOJI_FONT)), FONT_SIZE)


def render(char: str, size: int = 128) -> bytes | None:
    """The emoji as a ``size`` x ``size`` RGBA PNG (transparent background); None if the font has no drawing."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGBA", CANVAS, (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((0, 0), char, font=_font(), embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    glyph.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    out.paste(glyph, ((size - glyph.width) // 2, (size - glyph.height) // 2))
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def emoji_list(groups: list[str] | None = None) -> list[Emoji]:
    """The fully-qualified emoji, optionally of some groups only (names as in emoji-test.txt)."""
    emoji = parse_emoji_test(_require(EMOJI_TEST).read_text(encoding="utf-8"))
    if groups is not None:
        unknown = set(groups) - {e.group for e in emoji}
        if unknown:
            raise ValueError(f"unknown emoji groups {sorted(unknown)}; emoji-test.txt has "
                             f"{sorted({e.group for e in emoji})}")
        emoji = [e for e in emoji if e.group in groups]
    return emoji


def emoji_pairs(groups: list[str] | None = None, limit: int | None = None, size: int = 128,
                seed: int = 0) -> pa.Table:
    """The corpus as a table: id, image (PNG bytes), text (the name), group, subgroup.

    ``limit`` keeps a random sample of that many emoji (``seed``); emoji the font cannot draw are left out."""
    emoji = emoji_list(groups)
    if limit is not None and limit < len(emoji):
        keep = np.sort(np.random.default_rng(seed).choice(len(emoji), limit, replace=False))
        emoji = [emoji[i] for i in keep]
    rows = [(e, render(e.char, size)) for e in emoji]
    rows = [(e, png) for e, png in rows if png is not None]
    return pa.table({
        "id": pa.array(["u" + e.codepoints.replace(" ", "_") for e, _ in rows], pa.string()),
        "image": pa.array([png for _, png in rows], pa.binary()),
        "text": pa.array([e.name for e, _ in rows], pa.string()),
        "group": pa.array([e.group for e, _ in rows], pa.string()),
        "subgroup": pa.array([e.subgroup for e, _ in rows], pa.string()),
    })


def split_corpus(table: pa.Table, internal_groups: list[str], off_domain_groups: list[str],
                 internal_fraction: float = 0.5, incomplete_fraction: float = 0.25, noise_fraction: float = 0.2,
                 missing_image_share: float = 0.5, seed: int = 0) -> dict[str, pa.Table]:
    """Internal (complete), incomplete (one modality nulled) and external datasets from the corpus.

    Emoji of ``internal_groups`` are dealt to internal, incomplete and external at random; the external part
    adds every emoji of ``off_domain_groups`` (off-domain) and then gives ``noise_fraction`` of its rows a
    caption shuffled among themselves (mismatched pairs). Columns: id, image, text, label (the group),
    plus ``noise`` (bool) in the external table; the incomplete table keeps the truth in ``true_text`` /
    ``true_image``."""
    rng = np.random.default_rng(seed)
    group = np.asarray(table.column("group").to_pylist(), dtype=object)
    inside = np.flatnonzero(np.isin(group, internal_groups))
    off = np.flatnonzero(np.isin(group, off_domain_groups))
    order = rng.permutation(inside)
    n_int = int(round(internal_fraction * len(order)))
    n_inc = int(round(incomplete_fraction * len(order)))
    parts = {"internal": order[:n_int], "incomplete": order[n_int:n_int + n_inc],
             "external": np.concatenate([order[n_int + n_inc:], off])}
    base = table.select(["id", "image", "text"]).append_column("label", table.column("group"))
    out = {name: base.take(pa.array(np.sort(rows), pa.int64())) for name, rows in parts.items()}

    ext = out["external"]
    texts = ext.column("text").to_pylist()
    noisy = rng.random(ext.num_rows) < noise_fraction
    where = np.flatnonzero(noisy)
    shuffled = rng.permutation(where)
    for a, b in zip(where, shuffled):
        texts[a] = ext.column("text")[int(b)].as_py()
    noise = np.array([texts[i] != ext.column("text")[i].as_py() for i in range(ext.num_rows)])
    out["external"] = ext.set_column(2, "text", pa.array(texts, pa.string())).append_column(
        "noise", pa.array(noise))

    inc = out["incomplete"]
    lose_image = rng.random(inc.num_rows) < missing_image_share
    out["incomplete"] = pa.table({
        "id": inc.column("id"),
        "image": pa.array([None if lose else b for lose, b in zip(lose_image, inc.column("image").to_pylist())],
                          pa.binary()),
        "text": pa.array([t if lose else None for lose, t in zip(lose_image, inc.column("text").to_pylist())],
                         pa.string()),
        "label": inc.column("label"),
        "true_image": inc.column("image"),
        "true_text": inc.column("text"),
    })
    return out
