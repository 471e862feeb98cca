"""An offline image-text corpus with known ground truth, for the demo and the tests.

Each sample is a rendered scene: ``count`` shapes of one ``shape`` and ``colour`` in one ``position``
of the picture, on a ``background``; its caption states exactly those attributes. Three corpora:

* internal: complete, clean pairs in one rendering style and caption phrasing;
* external: the same world under a domain shift (dark textured backgrounds, outlined shapes and other
  caption phrasings, more of it as ``shift`` grows) with planted noise (random-noise and gradient
  images with unrelated captions, and mismatched pairs), marked in ``planted_noise``;
* incomplete: internal-style pairs with a modality removed, the truth kept in ``true_image``/``true_text``.

Everything is deterministic under the seed, and each row depends only on (seed, corpus, row number).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw

from rag4dmc.pipeline.io.datasets import CANONICAL_SCHEMA, write_jsonl, write_parquet, write_webdataset

IMAGE_SIZE = 128
SHAPES = ("circle", "square", "triangle", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (135, 50, 175),
    "orange": (240, 130, 25),
}
COUNTS = (1, 2, 3)
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
POSITIONS = ("left", "right", "top", "bottom", "center")
# Backgrounds are grey-ish (low saturation) so a shape's colour is never confused with them.
INTERNAL_BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250), "light grey": (215, 215, 215), "cream": (245, 238, 220), "beige": (232, 222, 200),
}
EXTERNAL_BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "charcoal": (54, 54, 58), "black": (15, 15, 15), "dark grey": (80, 80, 80), "dark brown": (70, 52, 40),
}
# Region of the picture (x0, y0, x1, y1 as fractions) where the shapes of each position are laid out.
REGIONS: dict[str, tuple[float, float, float, float]] = {
    "left": (0.03, 0.08, 0.40, 0.92),
    "right": (0.60, 0.08, 0.97, 0.92),
    "top": (0.08, 0.03, 0.92, 0.40),
    "bottom": (0.08, 0.60, 0.92, 0.97),
    "center": (0.15, 0.30, 0.85, 0.70),
}
SHAPE_SIZE = (0.55, 0.80)  # a shape's side as a fraction of its cell's smaller side
MAX_JITTER = 0.04  # a shape's offset from its cell's centre, as a fraction of the picture, at most
STAR_INNER_RADIUS = 0.45
OUTLINE_COLOUR = (200, 200, 200)
OUTLINE_WIDTH = 2
TEXTURE_AMPLITUDE = 40  # grey-level noise on external backgrounds at shift 1

INTERNAL_PLACES = {"left": "on the left", "right": "on the right", "top": "at the top",
                   "bottom": "at the bottom", "center": "in the center"}
EXTERNAL_PLACES = {"left": "toward the left side", "right": "toward the right side", "top": "near the top edge",
                   "bottom": "near the bottom edge", "center": "in the middle"}
INTERNAL_TEMPLATES = (
    "{count} {colour} {shapes} {place}",
    "a picture of {count} {colour} {shapes} {place}",
    "there {be} {count} {colour} {shapes} {place}",
    "{count} {colour} {shapes} {place} on a {background} background",
)
EXTERNAL_TEMPLATES = (
    "Illustration: {n} {colour} {shapes}, placed {place}.",
    "{Colour} {shapes} x{n} ({place}), {background} backdrop",
    "clip art of {n} {shapes} coloured {colour}, {place}",
)
UNRELATED_CAPTIONS = (
    "stainless steel water bottle 750 ml, free shipping",
    "men's leather wallet with coin pocket",
    "wireless earbuds with charging case, 24h battery",
    "vintage wooden coffee table, pickup only",
    "download the quarterly revenue report as pdf",
    "easy pizza recipes for beginners",
    "apartment for rent near downtown, 2 bedrooms",
    "cotton t-shirt size M, pack of 3",
)
NOISE_KINDS = ("random_noise", "gradient", "mismatch")

DEFAULT_SHIFT = 0.7
DEFAULT_NOISE_FRACTION = 0.2
DEFAULT_SHARDS = 2
# Independent random streams per corpus: a row depends only on (seed, stream, row number).
_STREAM_INTERNAL, _STREAM_EXTERNAL, _STREAM_INCOMPLETE, _STREAM_NOISE_ROWS, _STREAM_MASK = range(5)
_SHARD_EXTENSIONS = {"parquet": "parquet", "jsonl": "jsonl", "webdataset": "tar"}
_USER_COLUMNS = ("id", "image", "text")


@dataclass(frozen=True)
class Scene:
    """What a picture shows, and so what its caption says."""

    shape: str
    colour: str
    count: int
    position: str
    background: str

    @classmethod
    def sample(cls, rng: np.random.Generator, backgrounds: Sequence[str]) -> Scene:
        """A uniformly random scene on one of ``backgrounds``."""
        return cls(shape=str(rng.choice(SHAPES)), colour=str(rng.choice(list(COLOURS))),
                   count=int(rng.choice(COUNTS)), position=str(rng.choice(POSITIONS)),
                   background=str(rng.choice(list(backgrounds))))


@dataclass(frozen=True)
class Style:
    """How scenes are drawn and described: the domain of a corpus."""

    backgrounds: dict[str, tuple[int, int, int]]
    templates: tuple[str, ...]
    places: dict[str, str]
    outline: bool
    texture: float  # grey-level noise amplitude on the background


INTERNAL_STYLE = Style(INTERNAL_BACKGROUNDS, INTERNAL_TEMPLATES, INTERNAL_PLACES, outline=False, texture=0.0)


def external_style(shift: float) -> Style:
    """The external domain at full strength; ``shift`` scales its background texture."""
    return Style(EXTERNAL_BACKGROUNDS, EXTERNAL_TEMPLATES, EXTERNAL_PLACES, outline=True,
                 texture=TEXTURE_AMPLITUDE * shift)


def caption(scene: Scene, template: str, places: dict[str, str]) -> str:
    """The caption of ``scene`` through ``template``: it names shape, colour, count, position (and background)."""
    plural = scene.count > 1
    return template.format(
        count=COUNT_WORDS[scene.count], n=scene.count, colour=scene.colour, Colour=scene.colour.capitalize(),
        shapes=scene.shape + ("s" if plural else ""), be="are" if plural else "is",
        place=places[scene.position], background=scene.background,
    )


def _shape_polygon(shape: str, cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        angles, radii = [-90, 30, 150], [radius] * 3
    elif shape == "star":
        angles = [-90 + 36 * k for k in range(10)]
        radii = [radius if k % 2 == 0 else radius * STAR_INNER_RADIUS for k in range(10)]
    else:
        raise ValueError(f"{shape} is not a polygon shape")
    return [(cx + r * math.cos(math.radians(a)), cy + r * math.sin(math.radians(a))) for a, r in zip(angles, radii)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, size: float,
                fill: tuple[int, int, int], outline: tuple[int, int, int] | None) -> None:
    r = size / 2
    width = OUTLINE_WIDTH if outline else 0
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=width)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=width)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r), fill=fill, outline=outline, width=width)


def _layout(position: str, count: int, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """(cx, cy, size) of each shape: the region is cut into ``count`` cells along its longer side.

    A shape moves at most a quarter of its cell's slack off the cell centre, so neighbours never touch.
    """
    x0, y0, x1, y1 = (v * IMAGE_SIZE for v in REGIONS[position])
    horizontal = (x1 - x0) >= (y1 - y0)
    step = ((x1 - x0) if horizontal else (y1 - y0)) / count
    cell_w, cell_h = (step, y1 - y0) if horizontal else (x1 - x0, step)
    placed = []
    for k in range(count):
        size = float(rng.uniform(*SHAPE_SIZE)) * min(cell_w, cell_h)
        cx = (x0 + step * (k + 0.5)) if horizontal else (x0 + x1) / 2
        cy = (y0 + y1) / 2 if horizontal else (y0 + step * (k + 0.5))
        cx += float(rng.uniform(-1, 1)) * min((cell_w - size) / 4, MAX_JITTER * IMAGE_SIZE)
        cy += float(rng.uniform(-1, 1)) * min((cell_h - size) / 4, MAX_JITTER * IMAGE_SIZE)
        placed.append((cx, cy, size))
    return placed


def _png(pixels: np.ndarray | Image.Image) -> bytes:
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels.astype(np.uint8), "RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def render(scene: Scene, style: Style, rng: np.random.Generator) -> bytes:
    """PNG bytes of ``scene`` drawn in ``style``."""
    background = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), style.backgrounds[scene.background], dtype=np.float32)
    if style.texture > 0:  # grey noise: the same offset on each channel keeps the background unsaturated
        background += rng.uniform(-style.texture, style.texture, (IMAGE_SIZE, IMAGE_SIZE, 1))
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for cx, cy, size in _layout(scene.position, scene.count, rng):
        _draw_shape(draw, scene.shape, cx, cy, size, COLOURS[scene.colour],
                    OUTLINE_COLOUR if style.outline else None)
    return _png(image)


def _noise_image(kind: str, rng: np.random.Generator) -> bytes:
    if kind == "random_noise":
        return _png(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3)))
    start, end = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] / (IMAGE_SIZE - 1)
    t = (xs * math.cos(angle) + ys * math.sin(angle))
    t = ((t - t.min()) / (t.max() - t.min()))[..., None]
    return _png(start * (1 - t) + end * t)


def _different_scene(scene: Scene, rng: np.random.Generator) -> Scene:
    """A scene that differs from ``scene`` in shape and colour (a caption for it mismatches the image)."""
    return Scene(shape=str(rng.choice([s for s in SHAPES if s != scene.shape])),
                 colour=str(rng.choice([c for c in COLOURS if c != scene.colour])),
                 count=int(rng.choice(COUNTS)), position=str(rng.choice(POSITIONS)), background=scene.background)


def _table(ids: list[str], images: list[bytes], texts: list[str], corpus: str,
           scenes: list[Scene | None], extra: dict[str, pa.Array] | None = None) -> pa.Table:
    """The canonical columns, then the scene attributes (null for rows without a scene), then ``extra``."""
    n = len(ids)
    table = pa.table([ids, images, [None] * n, texts, [f"generated:{corpus}"] * n, [None] * n],
                     schema=CANONICAL_SCHEMA)
    for name, kind in (("shape", pa.string()), ("colour", pa.string()), ("count", pa.int32()),
                       ("position", pa.string()), ("background", pa.string())):
        table = table.append_column(name, pa.array([getattr(s, name) if s else None for s in scenes], kind))
    for name, values in (extra or {}).items():
        table = table.append_column(name, values)
    return table


def _clean_pairs(n: int, seed: int, stream: int, prefix: str, style: Style) -> pa.Table:
    ids, images, texts, scenes = [], [], [], []
    for i in range(n):
        rng = np.random.default_rng([seed, stream, i])
        scene = Scene.sample(rng, list(style.backgrounds))
        ids.append(f"{prefix}-{i:06d}")
        images.append(render(scene, style, rng))
        texts.append(caption(scene, str(rng.choice(style.templates)), style.places))
        scenes.append(scene)
    return _table(ids, images, texts, prefix, scenes)


def make_internal(n: int, seed: int = 0) -> pa.Table:
    """``n`` complete, clean pairs: canonical columns plus shape/colour/count/position/background."""
    return _clean_pairs(n, seed, _STREAM_INTERNAL, "int", INTERNAL_STYLE)


def make_external(n: int, seed: int = 0, shift: float = DEFAULT_SHIFT,
                  noise_fraction: float = DEFAULT_NOISE_FRACTION) -> pa.Table:
    """``n`` external pairs under a domain shift, ``round(n * noise_fraction)`` of them planted noise.

    A clean row is drawn and captioned in the external style with probability ``shift`` (in the
    internal style otherwise), and every row's background carries grey texture scaled by ``shift``.
    Noise rows (``planted_noise``; kind in ``noise_kind``) have no scene attributes.
    """
    if not 0 <= shift <= 1 or not 0 <= noise_fraction <= 1:
        raise ValueError(f"shift and noise_fraction must be in [0, 1], got {shift} and {noise_fraction}")
    shifted = external_style(shift)
    plain = replace(INTERNAL_STYLE, texture=shifted.texture)
    noisy = set(np.random.default_rng([seed, _STREAM_NOISE_ROWS]).permutation(n)[:round(n * noise_fraction)].tolist())
    rows = []
    for i in range(n):
        rng = np.random.default_rng([seed, _STREAM_EXTERNAL, i])
        rows.append(_external_row(rng, shifted if rng.random() < shift else plain, i in noisy))
    images, texts, scenes, kinds = (list(column) for column in zip(*rows)) if rows else ([], [], [], [])
    extra = {"planted_noise": pa.array([k is not None for k in kinds], pa.bool_()),
             "noise_kind": pa.array(kinds, pa.string())}
    return _table([f"ext-{i:06d}" for i in range(n)], images, texts, "ext", scenes, extra)


def _external_row(rng: np.random.Generator, style: Style, noisy: bool) -> tuple[bytes, str, Scene | None, str | None]:
    """(image, text, scene, noise kind): a clean pair in ``style``, or planted noise of a random kind."""
    scene = Scene.sample(rng, list(style.backgrounds))
    template = str(rng.choice(style.templates))
    if not noisy:
        return render(scene, style, rng), caption(scene, template, style.places), scene, None
    kind = str(rng.choice(NOISE_KINDS))
    if kind == "mismatch":  # a real picture, captioned as another scene
        return render(scene, style, rng), caption(_different_scene(scene, rng), template, style.places), None, kind
    return _noise_image(kind, rng), str(rng.choice(UNRELATED_CAPTIONS)), None, kind


def mask_modalities(table: pa.Table, missing_rate: float, image_fraction: float = 0.5, seed: int = 0) -> pa.Table:
    """Remove a modality from ``round(n * missing_rate)`` rows: the image from ``image_fraction`` of them.

    The originals are kept in ``true_image`` / ``true_text`` and ``missing`` says which modality
    ("image", "text" or null) each row lost.
    """
    if not 0 <= missing_rate <= 1 or not 0 <= image_fraction <= 1:
        raise ValueError(f"missing_rate and image_fraction must be in [0, 1], got {missing_rate}, {image_fraction}")
    if "true_image" in table.column_names:
        raise ValueError("table is already masked (it has a true_image column)")
    n = table.num_rows
    chosen = np.random.default_rng([seed, _STREAM_MASK]).permutation(n)[:round(n * missing_rate)]
    n_image = round(len(chosen) * image_fraction)
    missing = np.full(n, None, dtype=object)
    missing[chosen[:n_image]] = "image"
    missing[chosen[n_image:]] = "text"
    image, text = table.column("image"), table.column("text")
    no_image = pa.array(missing == "image")
    no_text = pa.array(missing == "text")
    masked = table.set_column(table.schema.get_field_index("image"), "image",
                              pc.if_else(no_image, pa.scalar(None, image.type), image))
    masked = masked.set_column(masked.schema.get_field_index("text"), "text",
                               pc.if_else(no_text, pa.scalar(None, text.type), text))
    return (masked.append_column("true_image", image).append_column("true_text", text)
            .append_column("missing", pa.array(missing.tolist(), pa.string())))


def make_incomplete(n: int, seed: int = 0, missing_rate: float = 1.0, image_fraction: float = 0.5) -> pa.Table:
    """``n`` internal-style pairs (independent of :func:`make_internal`'s) masked by :func:`mask_modalities`."""
    return mask_modalities(_clean_pairs(n, seed, _STREAM_INCOMPLETE, "inc", INTERNAL_STYLE),
                           missing_rate, image_fraction, seed)


def write_split(table: pa.Table, folder: str, shards: int = 1, format: str = "parquet", *,
                storage_options: dict | None = None) -> None:
    """``table`` as ``shards`` shards of about equal rows, ``folder/part-00000.<ext>`` on, in ``format``: how the demo,
    the benchmarks and the tests write a dataset."""
    bounds = np.linspace(0, table.num_rows, max(1, min(shards, table.num_rows)) + 1).astype(int)
    for j, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        uri = f"{folder}/part-{j:05d}.{_SHARD_EXTENSIONS[format]}"
        part = table.slice(lo, hi - lo)
        if format == "parquet":
            write_parquet(part, uri, storage_options)
        elif format == "jsonl":
            write_jsonl(part, uri, storage_options)
        else:
            write_webdataset(part, uri, storage_options)


def write_demo_corpus(out_dir: str, n_internal: int, n_external: int, n_incomplete: int, seed: int = 0,
                      format: str = "parquet", *, shards: int = DEFAULT_SHARDS, shift: float = DEFAULT_SHIFT,
                      noise_fraction: float = DEFAULT_NOISE_FRACTION, missing_rate: float = 1.0,
                      storage_options: dict | None = None) -> dict[str, str]:
    """Write the internal, external and incomplete datasets (id, image, text only) and their ground truth.

    Returns the paths by name: ``internal``, ``external``, ``incomplete`` (folders of ``shards``
    shards in ``format``) and ``truth`` (a folder with the full generated tables as parquet:
    attributes, ``planted_noise``, ``true_image``/``true_text``).
    """
    if format not in _SHARD_EXTENSIONS:
        raise ValueError(f"unknown format {format!r}: use one of {', '.join(_SHARD_EXTENSIONS)}")
    root = out_dir.rstrip("/")
    tables = {
        "internal": make_internal(n_internal, seed),
        "external": make_external(n_external, seed, shift, noise_fraction),
        "incomplete": make_incomplete(n_incomplete, seed, missing_rate),
    }
    paths = {name: f"{root}/{name}" for name in tables} | {"truth": f"{root}/truth"}
    for name, table in tables.items():
        write_split(table.select(list(_USER_COLUMNS)), paths[name], shards, format,
                    storage_options=storage_options)
        write_parquet(table, f"{paths['truth']}/{name}.parquet", storage_options)
    return paths
