"""Safe handling of image and text inputs, shared by every actor (pure functions).

Bad input is a per-row :class:`InputError` whose message says what was wrong; it never takes an actor
down. An image's size is checked from its header before any pixel is decoded, so a decompression bomb
costs nothing.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold; EncoderConfig.max_image_pixels
IMAGE_FORMATS = ("png", "jpeg", "webp")
DEFAULT_QUALITY = {"jpeg": 92, "webp": 90}
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white
ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
HIGH_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
HIGH_BIT_SCALE = 65535 / 255  # 16-bit samples to 8-bit
RESAMPLE = Image.Resampling.BICUBIC


class InputError(ValueError):
    """A per-row input problem (undecodable image, missing URI, empty text, ...)."""


def load_image(value: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               storage_options: dict | None = None) -> Image.Image:
    """An RGB image from bytes, a PIL image, or a local path / file:// / s3:// URI; InputError if unusable."""
    if isinstance(value, str):
        value = read_uri(value, storage_options)
    if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 1:
        value = value.tobytes()  # a binary cell as some Arrow/numpy conversions hand it over
    if isinstance(value, (bytes, bytearray, memoryview)):
        img = _open_header(bytes(value))
    elif isinstance(value, Image.Image):
        img = value
    else:
        raise InputError(f"image must be bytes, a PIL image or a path/URI, got {type(value).__name__}")
    check_size(img.size, max_pixels)
    try:
        img.load()  # decode the pixels only now that the size is known to be acceptable
        return to_rgb(img)
    except Exception as exc:  # PIL raises many types for truncated or corrupt data
        raise InputError(f"image could not be decoded ({type(exc).__name__}: {exc})") from None


def check_size(size: tuple[int, int], max_pixels: int) -> None:
    """InputError for a zero-size image or one over ``max_pixels`` (the decompression-bomb guard)."""
    w, h = size
    if w <= 0 or h <= 0:
        raise InputError(f"image has zero size ({w}x{h})")
    if w * h > max_pixels:
        raise InputError(f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} "
                         "(decompression-bomb guard; raise encoder.max_image_pixels to allow it)")


def _open_header(data: bytes) -> Image.Image:
    """A lazily opened image: PIL has read the header (size, mode) but no pixel data."""
    if not data:
        raise InputError("image is empty (zero bytes)")
    try:
        with warnings.catch_warnings():
            # PIL warns above its own limit; check_size() applies ours, which may be higher or lower.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # over twice PIL's limit: PIL refuses to open it at all
        raise InputError(f"image rejected as a decompression bomb ({exc})") from None
    except Image.UnidentifiedImageError:
        raise InputError(f"image could not be decoded: {len(data)} bytes in no known image format "
                         f"(starting {data[:8]!r})") from None
    except Exception as exc:
        raise InputError(f"image could not be decoded ({type(exc).__name__}: {exc})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, upright per EXIF: transparency composited on white; palette, grayscale, CMYK, 16-bit converted."""
    img = ImageOps.exif_transpose(img)
    if img.mode in HIGH_BIT_MODES:
        scaled = np.asarray(img, dtype=np.float32) / HIGH_BIT_SCALE
        img = Image.fromarray(np.clip(scaled.round(), 0, 255).astype(np.uint8))
    if img.mode in ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img if img.mode == "RGB" else img.convert("RGB")


def read_uri(uri: str, storage_options: dict | None = None) -> bytes:
    """The bytes behind a local path or URI; a missing or unreadable object is an InputError naming it."""
    from rag4dmc.pipeline.io.storage import url_to_fs

    try:
        fs, path = url_to_fs(uri, storage_options)
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise InputError(f"image URI not found: {uri}") from None
    except Exception as exc:  # any storage failure is this row's error
        raise InputError(f"image URI could not be read: {uri} ({type(exc).__name__}: {exc})") from None


def validate_text(value: Any) -> str:
    """The stripped text, or InputError for None, non-strings and empty/whitespace strings."""
    if value is None:
        raise InputError("text is missing (None)")
    if not isinstance(value, str):
        raise InputError(f"text must be a string, got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise InputError("text is empty or whitespace")
    return text


def encode_image(img: Image.Image, fmt: str = "png", quality: int | None = None) -> bytes:
    """The image encoded as PNG (lossless), JPEG or WebP (``quality`` 1-100; a per-format default if None)."""
    fmt = fmt.lower()
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"image format must be one of {IMAGE_FORMATS}, got {fmt!r}")
    options = {} if fmt == "png" else {"quality": quality or DEFAULT_QUALITY[fmt]}
    buf = io.BytesIO()
    to_rgb(img).save(buf, format=fmt.upper(), **options)
    return buf.getvalue()


def resize_for_model(img: Image.Image, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: the centred square crop, resized so the shorter side is ``size`` (bicubic)."""
    img = img if img.mode == "RGB" else to_rgb(img)
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    # Resizing straight from the crop box is shorter-side resize + centre crop in one resampling pass.
    square = img.resize((size, size), RESAMPLE, box=(left, top, left + side, top + side))
    return np.asarray(square, dtype=np.uint8)
