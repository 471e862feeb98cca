"""CPU preprocessing that Ray runs as tasks, apart from the GPU actors: route rows, decode, resize.

Each function takes and returns a numpy-format batch (dict of column arrays). A row whose input is
bad gets task "failed" and an error saying why; it is never dropped.
"""

from __future__ import annotations

import numpy as np

from actors.images import InputError, load_image, read_uri, resize_for_model, validate_text
from actors.resources import Resources
from pipeline.schema import TASK_FAILED, TASK_I2T, TASK_OBSERVED, TASK_T2I, numpy_stage

# CPU tasks take a quarter CPU: Ray Data's reads and the actor pools must fit beside them on 2 CPUs.
CPU_TASK = Resources(num_cpus=0.125, memory_gb=0.5, batch_size=64)


def _present_text(value) -> tuple[str | None, str | None]:
    """(text, error): a usable text, or why the value is not one; empty/whitespace means missing."""
    if value is None:
        return None, None
    if not isinstance(value, str):
        return None, f"text is not a string ({type(value).__name__})"
    try:
        return validate_text(value), None
    except InputError:
        return None, None  # empty or whitespace: the modality is missing


@numpy_stage
def route(batch: dict[str, np.ndarray], *, storage_options: dict | None = None) -> dict[str, np.ndarray]:
    """Decide per row which modality is missing; fetch image URIs into bytes so later stages need no I/O."""
    n = len(batch["row_key"])
    task = np.array(batch["task"], dtype=object)
    error = np.array(batch["error"], dtype=object)
    image = np.array(batch["image"], dtype=object)
    text = np.array(batch["text"], dtype=object)
    # Nulls arrive as None (numpy_stage); an empty URI means none either.
    uri = np.array([u if isinstance(u, str) and u else None for u in batch["image_uri"]], dtype=object)
    for i in range(n):
        if task[i] == TASK_FAILED:
            continue
        if (image[i] is None or len(image[i]) == 0) and uri[i]:
            try:
                image[i] = read_uri(uri[i], storage_options)
            except InputError as exc:
                task[i], error[i] = TASK_FAILED, str(exc)
                continue
        has_image = image[i] is not None and len(image[i]) > 0
        text[i], text_error = _present_text(text[i])
        if text_error and not has_image:
            task[i], error[i] = TASK_FAILED, text_error
        elif has_image and text[i] is not None:
            task[i] = TASK_OBSERVED
        elif has_image:
            task[i] = TASK_I2T
        elif text[i] is not None:
            task[i] = TASK_T2I
        else:
            task[i], error[i] = TASK_FAILED, "sample has neither an image nor a text: nothing to complete from"
        if image[i] is not None and len(image[i]) == 0:
            image[i] = None
    return {**batch, "task": task, "error": error, "image": image, "text": text, "image_uri": uri}


@numpy_stage
def decode_for_model(batch: dict[str, np.ndarray], *, size: int, max_pixels: int,
                     tasks: tuple[str, ...] = (TASK_I2T,)) -> dict[str, np.ndarray]:
    """Decode and resize the image of every row of ``tasks`` to ``size`` x ``size`` RGB (zeros elsewhere)."""
    n = len(batch["row_key"])
    pixels = np.zeros((n, size, size, 3), dtype=np.uint8)
    task = np.array(batch["task"], dtype=object)
    error = np.array(batch["error"], dtype=object)
    for i in range(n):
        if task[i] not in tasks:
            continue
        try:
            pixels[i] = resize_for_model(load_image(batch["image"][i], max_pixels=max_pixels), size)
        except InputError as exc:
            task[i], error[i] = TASK_FAILED, str(exc)
    return {**batch, "task": task, "error": error, "pixels": pixels}


@numpy_stage
def check_texts(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Validate the text of every t2i row (a failed row says why)."""
    task = np.array(batch["task"], dtype=object)
    error = np.array(batch["error"], dtype=object)
    for i, t in enumerate(task):
        if t == TASK_T2I:
            try:
                validate_text(batch["text"][i])
            except InputError as exc:
                task[i], error[i] = TASK_FAILED, str(exc)
    return {**batch, "task": task, "error": error}
