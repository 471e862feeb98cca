"""Generators of the missing modality, grounded in retrieved knowledge-base examples; n candidates each.

* ``NearestNeighbourTextGenerator`` / ``NearestNeighbourImageGenerator`` (the offline default): the
  candidates are the texts (images) of the top-n retrieved examples; no generative model runs, and the
  name ``nn-consensus-retrieval`` says so in the output's provenance.
* ``Blip2TextGenerator``: transformers BLIP2, prompted with the retrieved example as in the paper,
  n sampled captions per image in one batched ``generate`` call.
* ``SdxlImageGenerator``: diffusers SDXL, img2img from the retrieved example image (or text2img),
  n images per prompt, batched, one seeded generator per candidate.

Every generator takes a batch of queries with their retrieved examples (best first) and returns one list
of candidates per query. A query it cannot serve (no example, no usable example image) gets an empty list;
it never takes the batch down. Weights come from a local folder, an ``s3://`` prefix, or a hub name already
in the local cache: a missing model is a fast :class:`GeneratorNotFoundError`, never a download.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
from PIL import Image

from rag4dmc.actors import weights
from rag4dmc.actors.devices import inference, pick_device
from rag4dmc.actors.images import InputError, load_image
from rag4dmc.actors.resources import Resources
from rag4dmc.actors.weights import HF_CACHE

if TYPE_CHECKING:  # torch is imported where a model runs: the nearest-neighbour generators never need it
    import torch

log = logging.getLogger(__name__)

NN_NAME = "nn-consensus-retrieval"
BLIP2_PROMPT = "Please write two captions of the image. Caption 1: {example} Caption 2:"
CAPTION_MARKER = re.compile(r"\bCaption\s*\d+\s*:", re.IGNORECASE)  # where the model starts another caption
TEXT_FLAG, IMAGE_FLAG = "--text-generator", "--image-generator"
MODEL_DIR_FLAG = "--generator-model-dir"
TRANSFORMERS_MARKER = "config.json"  # a folder without it holds no transformers checkpoint
DIFFUSERS_MARKER = "model_index.json"  # ... and without this no diffusers pipeline
SDXL_MODES = ("img2img", "text2img")
SDXL_SIZE_MULTIPLE = 8  # SDXL wants height and width divisible by 8
PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # torch dtypes by name


@dataclass
class Example:
    """One retrieved knowledge-base example. Its image is held (in-memory KBs) or fetched by reference on
    first use (``picture``): a KB stores where each image is, and most retrieved examples' images are never
    needed."""

    id: str
    text: str
    image: bytes | None  # encoded image bytes, when already in memory
    score: float  # the retrieval's ranking score (sim_fuse in fusion mode)
    cross: float = float("nan")  # cos(z_hat_other, z_r_other): the cross term of the fusion
    fetch: Callable[[], tuple[bytes | None, str | None]] | None = field(default=None, repr=False, compare=False)
    problem: str | None = None  # why the image could not be had (set by picture())

    def picture(self) -> bytes | None:
        """The encoded image: held, or fetched once by reference (None, with ``problem`` set, when it cannot be)."""
        if self.image is None and self.fetch is not None:
            self.image, self.problem = self.fetch()
            self.fetch = None
        return self.image


class GeneratorNotFoundError(FileNotFoundError):
    """Generator weights are not where the configuration says (nothing is downloaded at run time)."""

    def __init__(self, model: str, where: str, flag: str):
        super().__init__(f"model {model} not found at {where}; pass {flag} nn for the offline default "
                         f"or point {MODEL_DIR_FLAG} at downloaded weights")


class TextGenerator(Protocol):
    """Image -> text: n caption candidates per query image."""

    name: str

    def generate(self, images: list[Image.Image], examples: list[list[Example]], n: int,
                 seed: int) -> list[list[str]]: ...


class ImageGenerator(Protocol):
    """Text -> image: n image candidates per prompt."""

    name: str

    def generate(self, texts: list[str], examples: list[list[Example]], n: int,
                 seed: int) -> list[list[Image.Image]]: ...


# ---------------------------------------------------------------------------------------------- pure helpers


def check_batch(queries: Sequence, examples: Sequence, n: int) -> None:
    """ValueError unless there is one example list per query and n >= 1 (a caller's bug, not a row's)."""
    if len(queries) != len(examples):
        raise ValueError(f"got {len(queries)} queries but {len(examples)} example lists; need one per query")
    if n < 1:
        raise ValueError(f"n (candidates per query) must be at least 1, got {n}")


def derive_seed(*keys: int) -> int:
    """A 31-bit seed that depends on every key (base seed, query index, candidate index, ...)."""
    return int(np.random.SeedSequence([int(k) % 2**64 for k in keys]).generate_state(1)[0] >> 1)


def grounding_text(examples: Sequence[Example]) -> str | None:
    """The best-ranked example text that is not blank, whitespace collapsed; None if there is none."""
    for example in examples:
        text = " ".join((example.text or "").split())
        if text:
            return text
    return None


def grounding_image(examples: Sequence[Example], size: int) -> Image.Image | None:
    """The best-ranked example image that decodes, resized to size x size; None if there is none."""
    for example in examples:
        if example.picture():
            try:
                return load_image(example.image).resize((size, size), Image.Resampling.BICUBIC)
            except InputError as exc:
                example.problem = f"image does not decode: {exc}"
    return None


def blip2_prompt(example_text: str) -> str:
    """The paper's prompt: the retrieved caption as caption 1, the model writes caption 2."""
    return BLIP2_PROMPT.format(example=" ".join(example_text.split()))


def clean_caption(text: str, prompt: str) -> str:
    """A generated caption without the echoed prompt, anything from a following "Caption N:", or extra spaces."""
    text, prompt = " ".join(text.split()), " ".join(prompt.split())
    if text.startswith(prompt):
        text = text[len(prompt):]
    return CAPTION_MARKER.split(text, maxsplit=1)[0].strip()


def torch_dtype(device: torch.device, precision: str) -> torch.dtype:
    """The requested half precision on cuda; fp32 on cpu, where half precision is slow or unsupported."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    import torch

    return getattr(torch, PRECISIONS[precision]) if device.type == "cuda" else torch.float32


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Within the block torch's global RNG (and the device's) starts from ``seed``; restored afterwards."""
    import torch

    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# ------------------------------------------------------------------------------------------------- loading


def resolve_model(model: str, model_dir: str | None, marker: str, flag: str,
                  storage_options: dict | None = None) -> str:
    """A local folder holding ``model`` (with its ``marker`` file): the path itself, ``model_dir/model``, an
    ``s3://`` prefix downloaded once, or a hub name already in the cache (``cache_dir=model_dir``)."""
    if "://" in model and not model.startswith("file://"):
        return fetch_prefix(model, model_dir, marker, flag, storage_options)
    local = model.removeprefix("file://")
    candidates = [Path(local).expanduser()] + ([Path(model_dir) / local] if model_dir else [])
    folder = next((str(c) for c in candidates if c.is_dir()), None)
    if folder is None:
        folder = weights.cached_snapshot(model, model_dir)
    if folder is None:
        places = [str(c) for c in candidates] + [model_dir or HF_CACHE]
        raise GeneratorNotFoundError(model, ", ".join(places), flag)
    if not os.path.isfile(os.path.join(folder, marker)):
        raise GeneratorNotFoundError(model, f"{folder} (the folder has no {marker})", flag)
    return folder


def fetch_prefix(uri: str, model_dir: str | None, marker: str, flag: str,
                 storage_options: dict | None = None) -> str:
    """An object-storage model folder downloaded once (``rag4dmc.actors.weights.fetch_prefix``); its local path."""
    local = weights.fetch_prefix(uri, model_dir, marker, storage_options)
    if local is None:
        raise GeneratorNotFoundError(uri, f"{uri} (no {marker} under that prefix)", flag)
    return local


# --------------------------------------------------------------------------------------- nearest neighbour


class NearestNeighbourTextGenerator:
    """Candidates are the texts of the top-n retrieved examples in rank order (fewer if fewer exist)."""

    # cost: the job's captioning stage, 0.0004 actor-seconds per row (bench/embed_stage.py)
    RESOURCES = Resources(num_cpus=0.25, num_gpus=0.0, batch_size=64, seconds_per_row=0.0004)
    name = NN_NAME

    def generate_indexed(self, images: list[Image.Image], examples: list[list[Example]], n: int,
                         seed: int) -> list[list[tuple[int, str]]]:
        """(example index, text) of the examples' non-blank texts; ``images`` and ``seed`` are unused."""
        check_batch(images, examples, n)
        return [[(j, e.text) for j, e in enumerate(ex[:n]) if e.text and e.text.strip()] for ex in examples]

    def generate(self, images: list[Image.Image], examples: list[list[Example]], n: int,
                 seed: int) -> list[list[str]]:
        """The examples' non-blank texts (images may be None)."""
        return [[c for _, c in row] for row in self.generate_indexed(images, examples, n, seed)]


class NearestNeighbourImageGenerator:
    """Candidates are the decoded images of the top-n retrieved examples in rank order."""

    # cost: decoding n example images and scoring them (NIQE, 0.186 s per 512 px image on one core; NaN and free
    # on small ones): assumed 0.05 s per row on small images, more on photos (docs/scaling.md)
    RESOURCES = Resources(num_cpus=0.25, num_gpus=0.0, batch_size=64, seconds_per_row=0.05)
    name = NN_NAME

    def generate_indexed(self, texts: list[str], examples: list[list[Example]], n: int,
                         seed: int) -> list[list[tuple[int, Image.Image]]]:
        """(example index, image) of the examples' images that decode (an undecodable one is skipped)."""
        check_batch(texts, examples, n)
        out = []
        for ex in examples:
            images = []
            for j, e in enumerate(ex[:n]):
                if e.picture():
                    try:
                        images.append((j, load_image(e.image)))
                    except InputError as exc:
                        e.problem = f"image does not decode: {exc}"
            out.append(images)
        return out

    def generate(self, texts: list[str], examples: list[list[Example]], n: int,
                 seed: int) -> list[list[Image.Image]]:
        """The examples' images that decode; ``seed`` is unused."""
        return [[c for _, c in row] for row in self.generate_indexed(texts, examples, n, seed)]


# ------------------------------------------------------------------------------------------------- BLIP2


class Blip2TextGenerator:
    """BLIP2 (any checkpoint) prompted with the best retrieved caption; n sampled captions per image."""

    # Three quarters of a GPU: OPT-2.7b in fp16 is about 8 GB, leaving room for a CLIP embedder (0.25) on a 24 GB
    # card. Cost: 4 sampled captions per row at an assumed 16 captions/s per A100 (docs/scaling.md). Host memory:
    # the fp16 weights (about 8 GB) pass through it on load: 12 GiB, which fits a g5.2xlarge beside a CLIP embedder.
    RESOURCES = Resources(num_cpus=1.0, num_gpus=0.75, memory_gb=12.0, gpu_batch_size=16, seconds_per_row=0.25)

    def __init__(self, model: str, model_dir: str | None = None, device: str = "auto", precision: str = "fp16",
                 max_new_tokens: int = 30, temperature: float = 1.0, top_p: float = 0.9, batch_size: int = 8,
                 storage_options: dict | None = None):
        path = resolve_model(model, model_dir, TRANSFORMERS_MARKER, TEXT_FLAG, storage_options)
        from transformers import AutoProcessor, Blip2ForConditionalGeneration  # after the fast failure

        self.device = pick_device(device)
        self.dtype = torch_dtype(self.device, precision)
        self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        self.processor.tokenizer.padding_side = "left"  # prompts of a batch end together, where generation starts
        self.model = Blip2ForConditionalGeneration.from_pretrained(path, local_files_only=True, dtype=self.dtype)
        self.model.to(self.device).eval()
        self.sampling = {"do_sample": True, "max_new_tokens": max_new_tokens, "temperature": temperature,
                         "top_p": top_p}
        self.batch_size = batch_size
        self.name = f"blip2:{model}"

    def generate(self, images: list[Image.Image], examples: list[list[Example]], n: int,
                 seed: int) -> list[list[str]]:
        """Up to n non-empty captions per image; none for an image without a retrieved caption."""
        check_batch(images, examples, n)
        out: list[list[str]] = [[] for _ in images]
        todo = [(i, text) for i, ex in enumerate(examples) if (text := grounding_text(ex)) is not None]
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            prompts = [blip2_prompt(text) for _, text in chunk]
            with seeded(derive_seed(seed, start), self.device):
                texts = self._sample([images[i] for i, _ in chunk], prompts, n)
            for k, (i, _) in enumerate(chunk):
                captions = (clean_caption(t, prompts[k]) for t in texts[k * n : (k + 1) * n])
                out[i] = [c for c in captions if c]
        return out

    @inference
    def _sample(self, images: list[Image.Image], prompts: list[str], n: int) -> list[str]:
        """n decoded samples per prompt, grouped by prompt, in one ``generate`` call."""
        inputs = self.processor(images=images, text=prompts, return_tensors="pt", padding=True).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        ids = self.model.generate(**inputs, num_return_sequences=n, **self.sampling)
        if not self.model.config.is_encoder_decoder:  # a decoder-only LM returns the prompt before the answer
            ids = ids[:, inputs["input_ids"].shape[1]:]
        return self.processor.batch_decode(ids, skip_special_tokens=True)


# -------------------------------------------------------------------------------------------------- SDXL


class SdxlImageGenerator:
    """SDXL (any checkpoint): img2img from the best retrieved image, or text2img; n images per prompt."""

    # Three quarters of a GPU: SDXL img2img in fp16 at 512 px, 4 images a call, stays within about 12 GB, leaving
    # room for a CLIP embedder (0.25) on a 24 GB card. Cost: 4 candidates x 18 steps at 512 px, 2.14 s per row on
    # an A100 (published SDXL it/s; docs/scaling.md). Host memory: the fp16 pipeline (UNet, two text encoders, VAE:
    # about 7 GB) passes through it on load, with the process's torch and the decoded images beside: 14 GiB, so
    # that with a CLIP embedder (4) it fits the ~22 GiB Ray gives a 32 GiB g5.2xlarge (ray_cluster.yaml).
    RESOURCES = Resources(num_cpus=1.0, num_gpus=0.75, memory_gb=14.0, gpu_batch_size=4, seconds_per_row=2.14)

    def __init__(self, model: str, model_dir: str | None = None, device: str = "auto", precision: str = "fp16",
                 mode: str = "img2img", strength: float = 0.6, steps: int = 30, guidance_scale: float = 5.0,
                 image_size: int = 512, batch_size: int = 4, storage_options: dict | None = None):
        if mode not in SDXL_MODES:
            raise ValueError(f"SDXL mode must be one of {SDXL_MODES}, got {mode!r}")
        if image_size % SDXL_SIZE_MULTIPLE:
            raise ValueError(f"SDXL image_size must be a multiple of {SDXL_SIZE_MULTIPLE}, got {image_size}")
        if not 0 < strength <= 1:
            raise ValueError(f"SDXL img2img strength must be in (0, 1], got {strength}")
        path = resolve_model(model, model_dir, DIFFUSERS_MARKER, IMAGE_FLAG, storage_options)
        from diffusers import (  # after the fast failure
            StableDiffusionXLImg2ImgPipeline,
            StableDiffusionXLPipeline,
        )

        self.device = pick_device(device)
        text2img = StableDiffusionXLPipeline.from_pretrained(
            path, local_files_only=True, dtype=torch_dtype(self.device, precision))
        text2img.to(self.device)
        # img2img shares the loaded components (no second copy of the weights)
        self.pipe = text2img if mode == "text2img" else StableDiffusionXLImg2ImgPipeline(**text2img.components)
        self.pipe.set_progress_bar_config(disable=True)
        self.mode, self.strength, self.steps = mode, strength, steps
        self.guidance_scale, self.image_size, self.batch_size = guidance_scale, image_size, batch_size
        self.name = f"sdxl:{model}"

    def generate(self, texts: list[str], examples: list[list[Example]], n: int,
                 seed: int) -> list[list[Image.Image]]:
        """n images of image_size x image_size per prompt; none for a blank prompt, or in img2img mode for a
        query with no example image that decodes. Candidate j of query q is seeded by (seed, q, j) alone."""
        check_batch(texts, examples, n)
        out: list[list[Image.Image]] = [[] for _ in texts]
        todo = []
        for q, (text, ex) in enumerate(zip(texts, examples)):
            if not isinstance(text, str) or not text.strip():
                log.warning("%s: query %d has no prompt text; no candidates", self.name, q)
                continue
            init = grounding_image(ex, self.image_size) if self.mode == "img2img" else None
            if self.mode == "img2img" and init is None:
                log.warning("%s: query %d has no retrieved image that decodes; no img2img candidates", self.name, q)
                continue
            todo.append((q, text, init))
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            images = self._sample(chunk, n, seed)
            for k, (q, _, _) in enumerate(chunk):
                out[q] = images[k * n : (k + 1) * n]
        return out

    @inference
    def _sample(self, chunk: list[tuple[int, str, Image.Image | None]], n: int, seed: int) -> list[Image.Image]:
        """n images per (query, prompt, init image), grouped by query, in one pipeline call."""
        import torch

        # cpu generators: the same draws on any device (diffusers moves the noise to the pipeline's device)
        generators = [torch.Generator(device="cpu").manual_seed(derive_seed(seed, q, j))
                      for q, _, _ in chunk for j in range(n)]
        kwargs = {"prompt": [text for _, text, _ in chunk], "num_images_per_prompt": n, "generator": generators,
                  "num_inference_steps": self.steps, "guidance_scale": self.guidance_scale}
        if self.mode == "img2img":
            kwargs.update(image=[init for _, _, init in chunk], strength=self.strength)
        else:
            kwargs.update(height=self.image_size, width=self.image_size)
        return self.pipe(**kwargs).images
