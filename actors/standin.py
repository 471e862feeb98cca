"""Stand-ins for the GPU stages, a benchmark and test aid: off unless ``RAG4DMC_STANDIN`` is set, free when off.

With the variable set, the factories of ``actors/encoders.py`` and ``actors/generators.py`` hand out these
classes instead of the configured ones, whatever the config selects:

* :class:`StandinEncoder` declares the GPU encoder's ``RESOURCES`` (``OpenClipEncoder``'s CPUs, GPU share
  and memory) with its ``seconds_per_row`` multiplied by ``scale``; it loads no model, holds its actor (and so
  its GPU share) for ``seconds_per_row`` per row of each call, and returns deterministic unit vectors (drawn
  from a hash of each row's bytes or text) of the configured encoder's dimensions (``describe_encoder``),
  so a KB built with the lite encoder still fits;
* :class:`StandinTextGenerator` and :class:`StandinImageGenerator` declare BLIP2's and SDXL's ``RESOURCES``,
  likewise scaled, hold their actor for the scaled time per row, and take their candidates from the
  nearest-neighbour generators (real and cheap).

Ray then schedules, packs and autoscales the job exactly as for the real models, at the published cost
ratios (docs/scaling.md), on fake GPUs (``ray.cluster_utils.Cluster(...).add_node(num_gpus=...)``) and with
almost no CPU of its own: ``bench/cluster.py`` measures the scale-out efficiency this way. ``RAG4DMC_STANDIN``
holds JSON, for example::

    RAG4DMC_STANDIN='{"scale": 0.01}'   # every declared per-row cost times 0.01
    RAG4DMC_STANDIN='{"scale": 0.01, "log": "/tmp/holds"}'   # and a line per call in /tmp/holds/<role>-<pid>.log

Each line of the log is ``role rows start end pid node`` (wall-clock seconds; the Ray node id, or ``-``): a
benchmark reads when each stand-in held its device and for how many rows, at a finer grain than the committed
output.

Ray workers of a local cluster inherit the variable; on a remote cluster, set it in the job's runtime
environment (``env_vars``). Build the knowledge base without it: a KB embedded by the stand-in encoder holds
hash vectors.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

    from rag4dmc.actors.generators import Example
    from rag4dmc.actors.resources import Resources
    from rag4dmc.pipeline.config import EncoderConfig, GeneratorConfig

ENV = "RAG4DMC_STANDIN"

# Published per-row costs on one A100 (docs/scaling.md), used where a class does not declare its own
# ``seconds_per_row``: open_clip ViT-L-14 query embedding of an image / a text, BLIP2 (4 captions), SDXL
# img2img (4 candidates x 18 steps at 512 px).
PUBLISHED_SECONDS_PER_ROW = {"encoder": 0.0016, "text_generator": 0.25, "image_generator": 2.14}
# A text query costs this fraction of an image query on the encoder (13.3 vs 162 GFLOP; 0.00013 vs 0.0016 s).
TEXT_COST_RATIO = 0.00013 / 0.0016


@dataclass(frozen=True)
class Settings:
    """What ``RAG4DMC_STANDIN`` says: ``scale`` multiplies every declared per-row cost (> 0); ``log``: a folder
    for a line per call (see the module's docstring)."""

    scale: float = 1.0
    log: str | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.scale, (int, float)) and self.scale > 0):
            raise ValueError(f"{ENV}: scale must be a number > 0, got {self.scale!r}")


def parse(text: str) -> Settings:
    """The settings of a ``RAG4DMC_STANDIN`` value (a JSON object; ``{}`` keeps the defaults)."""
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f'{ENV} is not JSON ({exc}): give an object, e.g. {{"scale": 0.01}}') from None
    if not isinstance(spec, dict):
        raise ValueError(f'{ENV} must be a JSON object, e.g. {{"scale": 0.01}}, got {text!r}')
    try:
        return Settings(**spec)
    except TypeError as exc:
        raise ValueError(f"{ENV}: {exc} (fields: scale, log)") from None


_settings: Settings | None = None
_loaded_from: str | None = None


def enabled() -> bool:
    """Whether the factories hand out stand-ins: ``RAG4DMC_STANDIN`` is set (a bad value fails here, loudly)."""
    if ENV not in os.environ:
        return False
    settings()
    return True


def settings() -> Settings:
    """The current settings (parsed again whenever the variable changes)."""
    global _settings, _loaded_from
    text = os.environ.get(ENV, "{}")
    if text != _loaded_from or _settings is None:
        _settings, _loaded_from = parse(text), text
    return _settings


_sleep = time.sleep  # what holds the device (tests replace it)


def hold(seconds: float, role: str, rows: int) -> None:
    """Keep the actor (and the GPU it holds) busy for ``seconds``, the stand-in's whole cost, for ``rows`` rows
    of a ``role`` call; noted in the log folder, if one is set."""
    start = time.time()
    if seconds > 0:
        _sleep(seconds)
    folder = settings().log
    if folder and rows:
        ray = sys.modules.get("ray")  # the node, where Ray runs this actor (never imported for it)
        node = ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else "-"
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{role}-{os.getpid()}.log"), "a") as f:
            f.write(f"{role} {rows} {start:.6f} {time.time():.6f} {os.getpid()} {node}\n")


def declared_seconds(resources: Any, role: str) -> float:
    """``resources.seconds_per_row``, or the published figure of ``role`` where the class declares none."""
    return float(getattr(resources, "seconds_per_row", None) or PUBLISHED_SECONDS_PER_ROW[role])


def scaled(resources: Resources, role: str, scale: float) -> Resources:
    """``resources`` with its per-row cost times ``scale`` (Resources without that field are returned as they are)."""
    if not hasattr(resources, "seconds_per_row"):
        return resources
    return replace(resources, seconds_per_row=declared_seconds(resources, role) * scale)


class _Scaled:
    """A class attribute that reads as the real class's ``RESOURCES`` with the current scale, per access
    (the scale may change between tests; each Ray worker reads its own environment)."""

    def __init__(self, real: Callable[[], type], role: str):
        self.real, self.role = real, role

    def __get__(self, obj, owner) -> Resources:
        return scaled(self.real().RESOURCES, self.role, settings().scale)


def seconds_per_row(role: str) -> float:
    """The scaled seconds a stand-in of ``role`` (encoder, text_generator, image_generator) holds its actor per row."""
    real = {"encoder": _open_clip, "text_generator": _blip2, "image_generator": _sdxl}[role]()
    return declared_seconds(real.RESOURCES, role) * settings().scale


def _open_clip() -> type:
    from rag4dmc.actors.encoders import OpenClipEncoder

    return OpenClipEncoder


def _blip2() -> type:
    from rag4dmc.actors.generators import Blip2TextGenerator

    return Blip2TextGenerator


def _sdxl() -> type:
    from rag4dmc.actors.generators import SdxlImageGenerator

    return SdxlImageGenerator


def unit_vector(key: bytes, dim: int) -> np.ndarray:
    """A float32 unit vector of ``dim`` drawn from a seed that is a hash of ``key``: the same key, the same vector."""
    seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    v = np.random.default_rng(seed).standard_normal(dim, dtype=np.float32)
    return v / np.linalg.norm(v)


def _stack(vectors: list[np.ndarray], dim: int) -> np.ndarray:
    return np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, dim), np.float32)


# ---------------------------------------------------------------------------------------------- encoder


class StandinEncoder:
    """The GPU encoder's declaration and interface; hash vectors after a scaled sleep, no model."""

    RESOURCES = _Scaled(_open_clip, "encoder")

    def __init__(self, cfg: EncoderConfig):
        from rag4dmc.actors.encoders import describe_encoder, encoder_image_size

        described = describe_encoder(cfg)
        self.name = f"standin:{described['name']}"
        self.image_dim, self.text_dim = int(described["image_dim"]), int(described["text_dim"])
        self.image_size = encoder_image_size(cfg)
        self.seconds_per_row = seconds_per_row("encoder")

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """[n, image_dim] unit vectors of uint8 [n, S, S, 3] arrays (the real encoders' shape check)."""
        pixels = np.asarray(pixels)
        if pixels.ndim != 4 or pixels.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"pixels must be [n, {self.image_size}, {self.image_size}, 3], got {pixels.shape}")
        hold(self.seconds_per_row * len(pixels), "encoder", len(pixels))
        return _stack([unit_vector(np.ascontiguousarray(p).tobytes(), self.image_dim) for p in pixels], self.image_dim)

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        """[n, image_dim] unit vectors of PIL images (hashed as decoded pixels, any size)."""
        hold(self.seconds_per_row * len(images), "encoder", len(images))
        keys = [f"{im.mode}{im.size}".encode() + im.tobytes() for im in images]
        return _stack([unit_vector(k, self.image_dim) for k in keys], self.image_dim)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """[n, text_dim] unit vectors of texts; a text costs ``TEXT_COST_RATIO`` of an image."""
        texts = list(texts)
        hold(self.seconds_per_row * TEXT_COST_RATIO * len(texts), "encoder", len(texts))
        return _stack([unit_vector(t.encode(), self.text_dim) for t in texts], self.text_dim)


# -------------------------------------------------------------------------------------------- generators


class _StandinGenerator:
    """A generator's declaration, a scaled sleep per row, and the nearest-neighbour generator's candidates."""

    role: str

    def __init__(self, inner):
        self.inner = inner
        self.name = f"standin:{inner.name}"
        self.seconds_per_row = seconds_per_row(self.role)

    def generate_indexed(self, queries: list, examples: list[list[Example]], n: int, seed: int) -> list[list]:
        hold(self.seconds_per_row * len(queries), self.role, len(queries))
        return self.inner.generate_indexed(queries, examples, n, seed)

    def generate(self, queries: list, examples: list[list[Example]], n: int, seed: int) -> list[list]:
        hold(self.seconds_per_row * len(queries), self.role, len(queries))
        return self.inner.generate(queries, examples, n, seed)


class StandinTextGenerator(_StandinGenerator):
    """BLIP2's declaration and cost; the neighbours' texts as candidates."""

    RESOURCES = _Scaled(_blip2, "text_generator")
    role = "text_generator"

    def __init__(self):
        from rag4dmc.actors.generators import NearestNeighbourTextGenerator

        super().__init__(NearestNeighbourTextGenerator())


class StandinImageGenerator(_StandinGenerator):
    """SDXL's declaration and cost; the neighbours' images as candidates."""

    RESOURCES = _Scaled(_sdxl, "image_generator")
    role = "image_generator"

    def __init__(self):
        from rag4dmc.actors.generators import NearestNeighbourImageGenerator

        super().__init__(NearestNeighbourImageGenerator())


# -------------------------------------------------------------------------------------------- factories


def encoder_class(cfg: EncoderConfig) -> type[StandinEncoder]:
    return StandinEncoder


def create_encoder(cfg: EncoderConfig) -> StandinEncoder:
    return StandinEncoder(cfg)


def text_generator_class(cfg: GeneratorConfig) -> type[StandinTextGenerator]:
    return StandinTextGenerator


def image_generator_class(cfg: GeneratorConfig) -> type[StandinImageGenerator]:
    return StandinImageGenerator


def create_text_generator(cfg: GeneratorConfig) -> StandinTextGenerator:
    return StandinTextGenerator()


def create_image_generator(cfg: GeneratorConfig) -> StandinImageGenerator:
    return StandinImageGenerator()


def gpu_seconds_per_row(share_i2t: float) -> dict[str, float]:
    """GPU-seconds per input row, by pool, with the current scale: each stage's ``seconds_per_row`` weighted by
    its direction's share of the rows. A stage's per-row cost counts a whole GPU (the published figures are
    per A100); the fraction an actor declares (a generator's 0.75) only lets a small encoder pack beside it.
    A cluster of G GPUs completes at most G / sum(values) rows per second."""
    s = {role: seconds_per_row(role) for role in PUBLISHED_SECONDS_PER_ROW}
    share_t2i = 1.0 - share_i2t
    return {"embed:i2t": share_i2t * s["encoder"], "generate:i2t": share_i2t * s["text_generator"],
            "embed:t2i": share_t2i * s["encoder"] * TEXT_COST_RATIO, "generate:t2i": share_t2i * s["image_generator"]}
