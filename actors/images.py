"""Safe handling of image and text inputs, shared by every actor.

Bad input is a per-row :class:`InputError` with a message that says what was wrong; it never takes an
actor down. Image sizes are checked from the header before any pixel is decoded, so a decompression
bomb costs nothing.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold
ENCODE_OPTIONS = {"png": {"optimize": False}, "jpeg": {"quality": 92}, "webp": {"quality": 90}}


class InputError(ValueError):
    """A per-row input problem (undecodable image, missing URI, empty text, ...)."""


def _open_bytes(data: bytes, max_pixels: int) -> Image.Image:
    if len(data) == 0:
        raise InputError("image is empty (zero bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # lazy: reads the header only
            w, h = img.size
            if w == 0 or h == 0:
                raise InputError(f"image has zero size ({w}x{h})")
            if w * h > max_pixels:
                raise InputError(f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} "
                                 "(decompression-bomb guard; raise encoder.max_image_pixels to allow it)")
            img.load()
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"image rejected as a decompression bomb: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise InputError(f"image could not be decoded ({type(exc).__name__}: {exc})") from None
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB with transparency composited on white; palette, grayscale, CMYK and 16-bit converted."""
    img = ImageOps.exif_transpose(img) if hasattr(img, "getexif") else img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.split()[-1])
        return canvas
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float32)
        arr = 255.0 * (arr - arr.min()) / max(float(arr.max() - arr.min()), 1.0)
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def load_image(value, *, max_pixels: int = DEFAULT_MAX_PIXELS, storage_options: dict | None = None) -> Image.Image:
    """An RGB image from bytes, a PIL image, or a local path / file:// / s3:// URI."""
    if isinstance(value, Image.Image):
        w, h = value.size
        if w == 0 or h == 0:
            raise InputError(f"image has zero size ({w}x{h})")
        if w * h > max_pixels:
            raise InputError(f"image is {w}x{h}, over the limit of {max_pixels} pixels")
        return to_rgb(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return to_rgb(_open_bytes(bytes(value), max_pixels))
    if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 1:
        return to_rgb(_open_bytes(value.tobytes(), max_pixels))
    if isinstance(value, str):
        return to_rgb(_open_bytes(read_uri(value, storage_options), max_pixels))
    raise InputError(f"image must be bytes, a PIL image or a path/URI, got {type(value).__name__}")


def read_uri(uri: str, storage_options: dict | None = None) -> bytes:
    """The bytes behind a local path or URI; a missing object is an InputError naming it."""
    import fsspec

    remote = "://" in uri and not uri.startswith("file://")
    try:
        with fsspec.open(uri, "rb", **((storage_options or {}) if remote else {})) as f:
            return f.read()
    except FileNotFoundError:
        raise InputError(f"image URI not found: {uri}") from None
    except Exception as exc:  # noqa: BLE001 - any storage failure is this row's error
        raise InputError(f"image URI could not be read: {uri} ({type(exc).__name__}: {exc})") from None


def validate_text(value) -> str:
    """The stripped text, or InputError for None, non-strings and empty/whitespace strings."""
    if value is None:
        raise InputError("text is missing")
    if not isinstance(value, str):
        raise InputError(f"text must be a string, got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise InputError("text is empty or whitespace")
    return text


def encode_image(img: Image.Image, fmt: str = "png") -> bytes:
    """The image encoded once as PNG, JPEG or WebP."""
    fmt = fmt.lower()
    if fmt not in ENCODE_OPTIONS:
        raise ValueError(f"image format must be one of {sorted(ENCODE_OPTIONS)}, got {fmt!r}")
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format=fmt.upper(), **ENCODE_OPTIONS[fmt])
    return buf.getvalue()


def resize_for_model(img: Image.Image, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: shorter side resized to ``size`` (bicubic), then centre-cropped."""
    img = to_rgb(img)
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
