"""Image and text inputs: every usable input becomes an RGB image or a clean string; every bad one is an
InputError that says what was wrong, and an oversized image is refused from its header, undecoded."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from rag4dmc.actors.images import InputError, encode_image, load_image, resize_for_model, validate_text

BOMB_SIDE = 20_000  # 400 megapixels: 1.2 GB as RGB if it were ever decoded
SMALL_LIMIT = 1_000_000


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def blank_png(width: int, height: int) -> bytes:
    """A valid 1-bit black PNG of any size, built row by row: a 20000x20000 one is ~50 KB, never in memory."""
    packer = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, grayscale, no interlace
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# --- load_image: what is accepted -----------------------------------------------------------------------


def test_blank_png_builder_makes_real_images():
    img = load_image(blank_png(300, 200))
    assert img.size == (300, 200) and img.mode == "RGB"
    assert np.asarray(img).max() == 0


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview, lambda b: np.frombuffer(b, np.uint8)])
def test_bytes_like_values_load_the_same_pixels(wrap):
    src = noise(17, 9)
    assert np.array_equal(np.asarray(load_image(wrap(png_bytes(src)))), np.asarray(src))


def test_paths_and_file_uris_load(tmp_path):
    src = noise(12, 8)
    path = tmp_path / "x.png"
    src.save(path)
    for value in (str(path), f"file://{path}"):
        assert np.array_equal(np.asarray(load_image(value)), np.asarray(src))


def test_s3_uri_loads_with_storage_options(s3_bucket, s3_server):
    import fsspec

    src = noise(10, 6)
    uri = f"{s3_bucket}/img/x.png"
    with fsspec.open(uri, "wb", **s3_server.storage_options) as f:
        f.write(png_bytes(src))
    img = load_image(uri, storage_options=s3_server.storage_options)
    assert np.array_equal(np.asarray(img), np.asarray(src))
    with pytest.raises(InputError, match="image URI not found"):
        load_image(f"{s3_bucket}/img/missing.png", storage_options=s3_server.storage_options)


def test_rgba_is_composited_on_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 0)      # fully transparent red -> white
    rgba[0, 1] = (255, 0, 0, 255)    # opaque red stays red
    rgba[1, 0] = (0, 0, 0, 128)      # half-transparent black -> mid grey
    out = np.asarray(load_image(png_bytes(Image.fromarray(rgba, "RGBA")))).astype(int)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [255, 0, 0]
    assert np.all(np.abs(out[1, 0] - 127) <= 1)


def test_palette_with_transparency_is_composited_on_white():
    pal = Image.new("P", (3, 1))
    pal.putpalette([0, 0, 255] + [0, 255, 0] * 255)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0  # index 0 (blue) is transparent
    out = np.asarray(load_image(png_bytes(pal)))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [0, 255, 0]


def test_grayscale_cmyk_and_16bit_become_rgb():
    gray = Image.fromarray(np.array([[0, 100, 255]], np.uint8), "L")
    assert np.asarray(load_image(png_bytes(gray)))[0].tolist() == [[0] * 3, [100] * 3, [255] * 3]

    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # no black ink, full magenta+yellow: red
    buf = io.BytesIO()
    cmyk.save(buf, format="JPEG", quality=100)
    red = np.asarray(load_image(buf.getvalue())).astype(int)
    assert np.all(red[..., 0] > 200) and np.all(red[..., 1:] < 60)

    deep = Image.fromarray(np.array([[0, 32896, 65535]], np.uint16))
    assert deep.mode == "I;16"
    out = np.asarray(load_image(png_bytes(deep)))
    assert out.dtype == np.uint8 and out[0, :, 0].tolist() == [0, 128, 255]


def test_pil_images_are_accepted_and_converted():
    out = load_image(Image.new("LA", (4, 3), (0, 0)))  # transparent black
    assert out.mode == "RGB" and out.size == (4, 3) and np.asarray(out).min() == 255


# --- load_image: what is refused -------------------------------------------------------------------------


def test_decompression_bomb_is_refused_from_the_header(monkeypatch):
    from PIL import ImageFile

    bomb = blank_png(BOMB_SIDE, BOMB_SIDE)
    assert len(bomb) < 200_000  # what arrives is small; decoding it would not be
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real_load(self))
    with pytest.raises(InputError, match="decompression bomb"):
        load_image(bomb)
    assert decoded == []  # refused from the header: no pixel was decoded


def test_our_pixel_limit_applies_before_decoding():
    with pytest.raises(InputError, match=r"5000x5000 = 25000000 pixels, over the limit of 1000000"):
        load_image(blank_png(5000, 5000), max_pixels=SMALL_LIMIT)
    assert load_image(blank_png(1000, 1000), max_pixels=SMALL_LIMIT).size == (1000, 1000)  # at the limit
    with pytest.raises(InputError, match="over the limit"):
        load_image(Image.new("RGB", (1001, 1000)), max_pixels=SMALL_LIMIT)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"", "empty"),
        (b"this is not an image", "no known image format"),
        (blank_png(0, 5), "could not be decoded"),
        (Image.new("RGB", (0, 5)), "zero size"),
        (5, "got int"),
        (None, "got NoneType"),
        ([b"\x89PNG"], "got list"),
    ],
    ids=["zero-bytes", "undecodable", "zero-width-png", "zero-size-pil", "int", "none", "list"],
)
def test_unusable_values_are_input_errors(value, message):
    with pytest.raises(InputError, match=message):
        load_image(value)


def test_truncated_file_is_an_input_error():
    whole = png_bytes(noise(64, 64))  # noise does not compress: the cut removes real pixel data
    assert load_image(whole).size == (64, 64)
    with pytest.raises(InputError, match="could not be decoded"):
        load_image(whole[: len(whole) // 2])


def test_missing_uri_names_it(tmp_path):
    missing = tmp_path / "nope.png"
    for value in (str(missing), f"file://{missing}"):
        with pytest.raises(InputError, match=f"image URI not found: {value}"):
            load_image(value)


def test_input_error_is_a_value_error():
    assert issubclass(InputError, ValueError)


# --- text ------------------------------------------------------------------------------------------------


def test_validate_text_strips():
    assert validate_text("  a red bus \n") == "a red bus"


@pytest.mark.parametrize(("value", "message"), [("", "empty"), ("  \t\n", "empty"), (None, "missing"),
                                                (5, "got int"), (b"bytes", "got bytes")])
def test_validate_text_refuses(value, message):
    with pytest.raises(InputError, match=message):
        validate_text(value)


# --- encode_image ----------------------------------------------------------------------------------------


def test_png_round_trip_is_lossless():
    src = noise(20, 10)
    assert np.array_equal(np.asarray(load_image(encode_image(src, "png"))), np.asarray(src))


@pytest.mark.parametrize("fmt", ["jpeg", "webp", "JPEG"])
def test_lossy_formats_decode_close_and_quality_trades_size(fmt):
    smooth = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))).convert("RGB")
    data = encode_image(smooth, fmt)
    back = np.asarray(load_image(data)).astype(int)
    assert back.shape == (64, 64, 3) and np.abs(back - np.asarray(smooth)).mean() < 3
    rough = noise(64, 64)
    assert len(encode_image(rough, fmt, quality=20)) < len(encode_image(rough, fmt, quality=95))


def test_encode_image_refuses_unknown_formats():
    with pytest.raises(ValueError, match="gif"):
        encode_image(noise(2, 2), "gif")


# --- resize_for_model ------------------------------------------------------------------------------------


def _stripes(width: int, height: int, horizontal: bool) -> Image.Image:
    """Red outer thirds and a green middle third along the longer side."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[..., 0] = 255
    if horizontal:
        arr[:, width // 3 : 2 * width // 3] = (0, 255, 0)
    else:
        arr[height // 3 : 2 * height // 3] = (0, 255, 0)
    return Image.fromarray(arr)


@pytest.mark.parametrize(("width", "height"), [(300, 100), (100, 300)])
def test_resize_keeps_the_centre_square(width, height):
    out = resize_for_model(_stripes(width, height, horizontal=width > height), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    inner = out[2:-2, 2:-2].astype(int)  # bicubic blends a pixel or so at the crop edges
    assert np.all(inner[..., 1] > 240) and np.all(inner[..., 0] < 15)


def test_resize_upscales_small_and_converts_modes():
    out = resize_for_model(Image.new("L", (5, 9), 200), 24)
    assert out.shape == (24, 24, 3) and np.all(np.abs(out.astype(int) - 200) <= 1)
