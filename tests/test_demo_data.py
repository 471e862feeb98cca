"""The demo corpus: deterministic, captions true to the pictures, planted noise and masking as requested."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from scipy import ndimage

from rag4dmc.pipeline.demo.corpus import (
    COLOURS,
    IMAGE_SIZE,
    INTERNAL_PLACES,
    SHAPES,
    make_external,
    make_incomplete,
    make_internal,
    mask_modalities,
    write_demo_corpus,
)
from rag4dmc.pipeline.io.datasets import read_dataset

# Reading a caption: the words a careful annotator would look for.
NUMBERS = {"one": 1, "two": 2, "three": 3, "1": 1, "2": 2, "3": 3}
PLACES = {"left": "left", "right": "right", "top": "top", "bottom": "bottom", "center": "center", "middle": "center"}
# Reading a picture: shapes are the saturated pixels (backgrounds and outlines are grey-ish).
MIN_SATURATION = 80
MIN_BLOB_PIXELS = 8
FILL_RATIO_BANDS = {"star": (0.0, 0.47), "triangle": (0.47, 0.65), "circle": (0.65, 0.9), "square": (0.9, 1.01)}


def _only(found: list, caption: str, what: str):
    assert len(set(found)) == 1, f"{caption!r} should name exactly one {what}, found {found}"
    return found[0]


def read_caption(caption: str) -> dict:
    """Shape, colour, count and position stated by a caption."""
    words = re.findall(r"[a-z]+|\d+", caption.lower())
    return {
        "colour": _only([w for w in words if w in COLOURS], caption, "colour"),
        "shape": _only([w.removesuffix("s") for w in words if w.removesuffix("s") in SHAPES], caption, "shape"),
        "count": _only([NUMBERS[w] for w in words if w in NUMBERS], caption, "count"),
        "position": _only([PLACES[w] for w in words if w in PLACES], caption, "position"),
    }


def read_picture(png: bytes) -> dict:
    """Dominant shape colour, number of shapes, the mean of their centres and each one's bounding-box fill ratio."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    assert rgb.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    mask = rgb.max(-1) - rgb.min(-1) > MIN_SATURATION
    palette = np.array(list(COLOURS.values()))
    nearest = ((rgb[mask][:, None, :] - palette[None]) ** 2).sum(-1).argmin(1)
    labels, _ = ndimage.label(mask)
    boxes = [(box, (labels[box] == k).sum()) for k, box in enumerate(ndimage.find_objects(labels), start=1)]
    boxes = [(box, area) for box, area in boxes if area >= MIN_BLOB_PIXELS]
    centres = np.array([[(b[1].start + b[1].stop) / 2, (b[0].start + b[0].stop) / 2] for b, _ in boxes]) / IMAGE_SIZE
    return {"colour": list(COLOURS)[np.bincount(nearest).argmax()], "count": len(boxes),
            "x": centres[:, 0].mean(), "y": centres[:, 1].mean(),
            "fill_ratios": [area / labels[box].size for box, area in boxes]}


def assert_position(position: str, x: float, y: float) -> None:
    checks = {"left": x < 0.35, "right": x > 0.65, "top": y < 0.35, "bottom": y > 0.65,
              "center": abs(x - 0.5) < 0.1 and abs(y - 0.5) < 0.1}
    assert checks[position], f"shapes at ({x:.2f}, {y:.2f}) are not {position}"


def test_corpora_are_deterministic_under_the_seed_and_rows_do_not_depend_on_n() -> None:
    assert make_internal(12, seed=3).equals(make_internal(12, seed=3))
    assert make_internal(8, seed=3).equals(make_internal(12, seed=3).slice(0, 8))
    assert make_internal(12, seed=3).column("image") != make_internal(12, seed=4).column("image")
    assert make_external(15, seed=3).equals(make_external(15, seed=3))
    assert make_external(15, seed=3).column("text") != make_external(15, seed=4).column("text")
    assert make_incomplete(10, seed=1).equals(make_incomplete(10, seed=1))


def test_internal_captions_state_what_the_pictures_show() -> None:
    table = make_internal(80, seed=5)
    for row in table.to_pylist():
        said, seen = read_caption(row["text"]), read_picture(row["image"])
        assert said == {k: row[k] for k in ("colour", "shape", "count", "position")}
        assert seen["colour"] == said["colour"], row["text"]
        assert seen["count"] == said["count"], row["text"]
        assert_position(said["position"], seen["x"], seen["y"])
        lo, hi = FILL_RATIO_BANDS[said["shape"]]
        assert all(lo <= r < hi for r in seen["fill_ratios"]), (row["text"], seen["fill_ratios"])
    # every attribute value occurs: the corpus spans the whole vocabulary
    assert set(table.column("shape").to_pylist()) == set(SHAPES)
    assert set(table.column("colour").to_pylist()) == set(COLOURS)


def test_external_clean_rows_are_true_to_their_pictures_under_the_shift() -> None:
    table = make_external(80, seed=6, shift=1.0, noise_fraction=0.0)
    for row in table.to_pylist():
        said, seen = read_caption(row["text"]), read_picture(row["image"])
        assert said == {k: row[k] for k in ("colour", "shape", "count", "position")}
        assert (seen["colour"], seen["count"]) == (said["colour"], said["count"]), row["text"]
        assert_position(said["position"], seen["x"], seen["y"])


def _background_brightness(png: bytes) -> float:
    return float(np.asarray(Image.open(io.BytesIO(png)).convert("L"))[:4, :4].mean())  # a corner: never a shape


def _template_phrases(captions: list[str]) -> int:
    return sum(any(place in c for place in INTERNAL_PLACES.values()) for c in captions)


def test_external_domain_shift_changes_rendering_and_phrasing_with_strength() -> None:
    internal = make_internal(40, seed=2)
    shifted = make_external(40, seed=2, shift=1.0, noise_fraction=0.0)
    unshifted = make_external(40, seed=2, shift=0.0, noise_fraction=0.0)
    brightness = {name: np.mean([_background_brightness(b) for b in t.column("image").to_pylist()])
                  for name, t in (("internal", internal), ("shifted", shifted), ("unshifted", unshifted))}
    assert brightness["shifted"] < 100 < brightness["internal"]
    assert brightness["unshifted"] > 100
    assert _template_phrases(internal.column("text").to_pylist()) == 40
    assert _template_phrases(unshifted.column("text").to_pylist()) == 40
    assert _template_phrases(shifted.column("text").to_pylist()) == 0
    assert set(shifted.column("background").to_pylist()).isdisjoint(internal.column("background").to_pylist())
    half = make_external(200, seed=2, shift=0.5, noise_fraction=0.0)
    assert 60 < _template_phrases(half.column("text").to_pylist()) < 140


@pytest.mark.parametrize("n, fraction", [(50, 0.3), (41, 0.2), (20, 0.0)])
def test_planted_noise_has_the_requested_fraction_and_is_off_domain(n: int, fraction: float) -> None:
    table = make_external(n, seed=7, noise_fraction=fraction)
    noisy = table.filter(table.column("planted_noise"))
    assert noisy.num_rows == round(n * fraction)
    assert noisy.column("shape").null_count == noisy.num_rows  # noise rows describe no scene
    assert table.filter(pa.compute.invert(table.column("planted_noise"))).column("shape").null_count == 0
    for row in noisy.to_pylist():
        if row["noise_kind"] == "mismatch":  # a real scene with the caption of another one
            said, seen = read_caption(row["text"]), read_picture(row["image"])
            assert said["colour"] != seen["colour"]
        else:  # random noise or a gradient, with a caption from another world
            words = set(re.findall(r"[a-z]+", row["text"].lower()))
            assert words.isdisjoint(set(COLOURS) | set(SHAPES) | {s + "s" for s in SHAPES})


def test_planted_noise_covers_every_kind() -> None:
    kinds = make_external(60, seed=8, noise_fraction=0.5).column("noise_kind").drop_null().to_pylist()
    assert set(kinds) == {"random_noise", "gradient", "mismatch"}


def test_mask_modalities_hits_the_rate_and_the_ratio_and_keeps_the_truth() -> None:
    table = make_internal(40, seed=9)
    masked = mask_modalities(table, missing_rate=0.5, image_fraction=0.25, seed=1)
    missing = masked.column("missing").to_pylist()
    assert missing.count("image") == 5 and missing.count("text") == 15 and missing.count(None) == 20
    assert masked.column("true_image").equals(table.column("image"))
    assert masked.column("true_text").equals(table.column("text"))
    for row, m in zip(masked.to_pylist(), missing):
        assert (row["image"] is None) == (m == "image")
        assert (row["text"] is None) == (m == "text")
        if m is None:
            assert (row["image"], row["text"]) == (row["true_image"], row["true_text"])
    assert mask_modalities(table, 0.5, 0.25, seed=1).equals(masked)
    assert mask_modalities(table, 0.5, 0.25, seed=2).column("missing") != masked.column("missing")
    with pytest.raises(ValueError, match="already masked"):
        mask_modalities(masked, 0.5)
    with pytest.raises(ValueError, match="missing_rate"):
        mask_modalities(table, 1.5)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "webdataset"])
def test_written_corpus_reads_back_with_its_ground_truth(tmp_path: Path, fmt: str) -> None:
    paths = write_demo_corpus(str(tmp_path / "demo"), n_internal=6, n_external=10, n_incomplete=4, seed=0,
                              format=fmt)
    internal, errors = read_dataset(paths["internal"])
    assert errors == [] and internal.num_rows == 6
    incomplete, _ = read_dataset(paths["incomplete"])
    truth = pq.read_table(f"{paths['truth']}/incomplete.parquet")
    assert incomplete.column("id").to_pylist() == truth.column("id").to_pylist()
    has_image = [b is not None or u is not None for b, u in zip(incomplete.column("image").to_pylist(),
                                                                   incomplete.column("image_uri").to_pylist())]
    has_text = [t is not None for t in incomplete.column("text").to_pylist()]
    assert [not i for i in has_image] == [m == "image" for m in truth.column("missing").to_pylist()]
    assert all(i != t for i, t in zip(has_image, has_text))  # each incomplete row has exactly one modality
    external_truth = pq.read_table(f"{paths['truth']}/external.parquet")
    assert external_truth.column("planted_noise").to_pylist().count(True) == 2
    assert read_dataset(paths["external"])[0].column("id").to_pylist() == external_truth.column("id").to_pylist()
