"""The evaluation's data: read complete pairs, embed them once, split off a test set, mask the training split."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from rag4dmc.pipeline.config import (
    EncoderConfig,
    EvalConfig,
)
from rag4dmc.pipeline.core.mapping import MIN_TRAIN_PAIRS
from rag4dmc.pipeline.io.datasets import LABEL_COLUMN

log = logging.getLogger(__name__)

MIN_TEST_PAIRS = 2  # recall ranks each test pair against the others
LEFT_OUT_SHOWN = 5  # reasons for left-out rows quoted in the log and in metrics.json


class EvaluationError(ValueError):
    """The data cannot support the requested evaluation; the message says what to change."""


@dataclass
class EvalData:
    """Everything embedded once: training rows (with truth and mask), test pairs, external pairs."""

    train: pa.Table
    lose_image: np.ndarray
    lose_text: np.ndarray
    train_img: np.ndarray
    train_txt: np.ndarray
    test_img: np.ndarray
    test_txt: np.ndarray
    external: pa.Table
    ext_img: np.ndarray
    ext_txt: np.ndarray
    encoder_name: str
    missing_rate: float = 0.0






def read_pairs(path: str, cfg: EvalConfig, data_format: str = "auto") -> tuple[pa.Table, list[str]]:
    """The rows at ``path`` with both modalities (id, image bytes, text), and what was left out and why.

    Images given as a path or URI are fetched (with the storage options). Rows that cannot be used (a
    missing modality, an input error, an unreadable image URI) and shards that cannot be read are left
    out and described, one message each.
    """
    from rag4dmc.actors.images import InputError, read_uri
    from rag4dmc.pipeline.io.datasets import read_dataset

    options = cfg.storage.fsspec_options()
    table, problems = read_dataset(path, cfg.columns, options, data_format)
    ids, images, texts, labels = [], [], [], []
    for row in table.to_pylist():
        if row["input_error"]:
            problems.append(f"{row['id']}: {row['input_error']}")
            continue
        image = row["image"]
        if image is None and row["image_uri"]:
            try:
                image = read_uri(row["image_uri"], options)
            except InputError as exc:
                problems.append(f"{row['id']}: {exc}")
                continue
        if image is None or row["text"] is None:
            problems.append(f"{row['id']}: no {'image' if image is None else 'text'} (evaluation needs complete pairs)")
            continue
        ids.append(row["id"])
        images.append(image)
        texts.append(row["text"])
        labels.append(row.get(LABEL_COLUMN))
    out = pa.table({"id": pa.array(ids, pa.string()), "image": pa.array(images, pa.binary()),
                    "text": pa.array(texts, pa.string())})
    if cfg.columns.label:
        out = out.append_column(LABEL_COLUMN, pa.array(labels, pa.string()))
    return out, problems


def embed_pairs(table: pa.Table, encoder, cfg: EncoderConfig = EncoderConfig()
                ) -> tuple[pa.Table, np.ndarray, np.ndarray, list[str]]:
    """Image and text embeddings of ``table``'s rows; rows that do not decode are left out (and described).

    Images are decoded ``cfg.batch_size`` at a time, with ``cfg.max_image_pixels`` as the size limit.
    """
    from rag4dmc.actors.images import InputError, load_image, validate_text

    batch = cfg.batch_size
    keep: list[int] = []
    problems: list[str] = []
    img_parts = [np.zeros((0, encoder.image_dim), np.float32)]
    txt_parts = [np.zeros((0, encoder.text_dim), np.float32)]
    ids, images, texts = (table.column(c).to_pylist() for c in ("id", "image", "text"))
    for start in range(0, table.num_rows, batch):
        pictures, captions = [], []
        for i in range(start, min(start + batch, table.num_rows)):
            try:
                picture = load_image(images[i], max_pixels=cfg.max_image_pixels)
                captions.append(validate_text(texts[i]))
            except InputError as exc:
                problems.append(f"{ids[i]}: {exc}")
                continue
            pictures.append(picture)
            keep.append(i)
        img_parts.append(encoder.encode_images(pictures))
        txt_parts.append(encoder.encode_texts(captions))
    return table.take(keep), np.concatenate(img_parts), np.concatenate(txt_parts), problems


def split(complete: pa.Table, complete_img: np.ndarray, complete_txt: np.ndarray, external: pa.Table,
          ext_img: np.ndarray, ext_txt: np.ndarray, encoder_name: str, test_fraction: float = 0.2,
          seed: int = 0) -> EvalData:
    """Set aside the test split; nothing is masked yet (see :func:`mask`)."""
    n = complete.num_rows
    n_test = max(MIN_TEST_PAIRS, int(round(test_fraction * n)))
    if n - n_test < MIN_TRAIN_PAIRS:
        raise EvaluationError(f"{n} complete pairs are too few: {n_test} go to the test split and the training "
                              f"split needs at least {MIN_TRAIN_PAIRS}; give more complete data")
    order = np.random.default_rng([seed, 0]).permutation(n)
    test, train = order[:n_test], order[n_test:]
    none = np.zeros(len(train), bool)
    return EvalData(complete.take(train), none, none.copy(), complete_img[train], complete_txt[train],
                    complete_img[test], complete_txt[test], external, ext_img, ext_txt, encoder_name)


def mask(data: EvalData, missing_rate: float, image_fraction: float = 0.5, seed: int = 0) -> EvalData:
    """``data`` with ``round(missing_rate * n_train)`` training rows losing a modality.

    One permutation of the training rows is cut at every rate, so the rows masked at a lower rate are
    also masked at a higher one; the first ``image_fraction`` of the masked rows lose the image.
    """
    n = data.train.num_rows
    order = np.random.default_rng([seed, 1]).permutation(n)
    masked = order[: int(round(missing_rate * n))]
    n_image = int(round(image_fraction * len(masked)))
    lose_image, lose_text = np.zeros(n, bool), np.zeros(n, bool)
    lose_image[masked[:n_image]], lose_text[masked[n_image:]] = True, True
    observed = n - len(masked)
    if observed < MIN_TRAIN_PAIRS:
        raise EvaluationError(f"at missing rate {missing_rate:g} only {observed} of {n} training pairs stay "
                              f"complete; the knowledge base needs at least {MIN_TRAIN_PAIRS}: give more complete "
                              "data or a lower evaluation.missing_rates")
    return replace(data, lose_image=lose_image, lose_text=lose_text, missing_rate=missing_rate)


def prepare(complete: pa.Table, external: pa.Table, missing_rate: float, encoder, test_fraction: float = 0.2,
            image_fraction: float = 0.5, seed: int = 0) -> EvalData:
    """Embed, split and mask in one call (tables with id, image bytes and text)."""
    complete, ci, ct, _ = embed_pairs(complete, encoder)
    external, ei, et, _ = embed_pairs(external, encoder)
    data = split(complete, ci, ct, external, ei, et, encoder.name, test_fraction, seed)
    return mask(data, missing_rate, image_fraction, seed)
