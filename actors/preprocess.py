"""CPU stages that Ray runs as tasks, apart from the GPU actors: routing at read time, fetch + decode, text checks.

A row whose input is bad gets task "failed" and an error saying why; it is never dropped.
"""

from __future__ import annotations

import numpy as np

from rag4dmc.actors.images import InputError, load_image, read_uri, resize_for_model, validate_text
from rag4dmc.actors.resources import Resources
from rag4dmc.actors.stage import Column, Produced, Stage
from rag4dmc.pipeline.schema import TASK_FAILED, TASK_I2T, TASK_OBSERVED, TASK_T2I

# CPU tasks take an eighth of a CPU: Ray Data's reads and the actor pools must fit beside them on 2 CPUs.
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


def route_row(image: bytes | None, uri: str | None, text) -> tuple[str, str | None, str | None]:
    """(task, text, error) of one input row, from what it holds (no I/O): which modality is missing.

    An image counts as present when it has bytes or a URI; a URI that cannot be read fails the row later,
    in the stage that fetches it. Empty or whitespace-only text is a missing text."""
    has_image = bool(image) or bool(uri)
    clean, text_error = _present_text(text)
    if text_error and not has_image:
        return TASK_FAILED, None, text_error
    if has_image and clean is not None:
        return TASK_OBSERVED, clean, None
    if has_image:
        return TASK_I2T, None, None
    if clean is not None:
        return TASK_T2I, clean, None
    return TASK_FAILED, None, "sample has neither an image nor a text: nothing to complete from"


class FetchAndDecode(Stage):
    """Fetch the image of URI-only rows, then decode and resize it to the encoder's ``size`` x ``size`` RGB."""

    name, ACTOR = "decode", False
    RESOURCES = CPU_TASK
    reads = ("image", "image_uri")
    drops = ()

    def __init__(self, size: int, max_pixels: int, storage_options: dict | None = None,
                 tasks: tuple[str, ...] = (TASK_I2T,)):
        self.size, self.max_pixels, self.storage_options, self.tasks = size, max_pixels, storage_options, tasks
        self.writes = (Column("image"), Column("pixels", 0, np.uint8, (size, size, 3)))

    def process(self, rows):
        m = len(rows["row_key"])
        images = list(rows["image"])
        pixels = np.zeros((m, self.size, self.size, 3), np.uint8)
        errors: list[str | None] = [None] * m
        for j in range(m):
            try:
                if not images[j]:
                    images[j] = read_uri(rows["image_uri"][j], self.storage_options)
                pixels[j] = resize_for_model(load_image(images[j], max_pixels=self.max_pixels), self.size)
            except InputError as exc:
                errors[j] = str(exc)
        return Produced({"image": images, "pixels": pixels}, errors)


class CheckTexts(Stage):
    """Validate the text of every text-only row (a failed row says why)."""

    name, ACTOR = "check_text", False
    RESOURCES = CPU_TASK
    tasks = (TASK_T2I,)
    reads = ("text",)

    def process(self, rows):
        errors: list[str | None] = []
        for t in rows["text"]:
            try:
                validate_text(t)
                errors.append(None)
            except InputError as exc:
                errors.append(str(exc))
        return Produced({}, errors)
