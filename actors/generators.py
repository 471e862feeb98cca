"""Generators of the missing modality, grounded in retrieved knowledge-base examples; n candidates each.

* ``NearestNeighbourTextGenerator`` / ``NearestNeighbourImageGenerator`` (the offline default): the
  candidates are the texts (images) of the top-n retrieved examples; no generative model runs, and the
  name ``nn-consensus-retrieval`` says so in the output's provenance.
* ``Blip2TextGenerator``: transformers BLIP2, prompted with the retrieved example as in the paper,
  n sampled captions per image in one batched ``generate`` call.
* ``SdxlImageGenerator``: diffusers SDXL, img2img from the retrieved example image (or text2img),
  n images per prompt, batched and seeded.

Weights come from a local folder, an ``s3://`` prefix, or a hub name already in the local cache
(``local_files_only``): a missing model is a fast, clear error, never a download.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

from actors.encoders import pick_device
from actors.images import InputError, load_image
from actors.resources import Resources
from pipeline.config import GeneratorConfig

NN_NAME = "nn-consensus-retrieval"
BLIP2_PROMPT = "Please write two captions of the image. Caption 1: {example} Caption 2:"


@dataclass(frozen=True)
class Example:
    """One retrieved knowledge-base example."""

    id: str
    text: str
    image: bytes | None
    score: float


class GeneratorNotFoundError(FileNotFoundError):
    def __init__(self, model: str, where: str, flag: str):
        super().__init__(f"model {model} not found at {where}; pass {flag} nn for the offline default "
                         "or point --generator-model-dir at downloaded weights")


class TextGenerator(Protocol):
    name: str

    def generate(self, images: list, examples: list[list[Example]], n: int, seed: int) -> list[list[str]]: ...


class ImageGenerator(Protocol):
    name: str

    def generate(self, texts: list[str], examples: list[list[Example]], n: int,
                 seed: int) -> list[list[Image.Image]]: ...


class NearestNeighbourTextGenerator:
    """Candidates are the retrieved examples' texts, best first (at most n; none when nothing was found)."""

    RESOURCES = Resources(num_cpus=0.125, num_gpus=0.0, memory_gb=1.0, batch_size=64)
    name = NN_NAME

    def generate(self, images: list, examples: list[list[Example]], n: int, seed: int) -> list[list[str]]:
        return [[e.text for e in ex[:n] if e.text] for ex in examples]


class NearestNeighbourImageGenerator:
    """Candidates are the retrieved examples' images, decoded, best first."""

    RESOURCES = Resources(num_cpus=0.125, num_gpus=0.0, memory_gb=1.0, batch_size=64)
    name = NN_NAME

    def generate(self, texts: list[str], examples: list[list[Example]], n: int,
                 seed: int) -> list[list[Image.Image]]:
        out = []
        for ex in examples:
            cands = []
            for e in ex[:n]:
                if e.image:
                    with contextlib.suppress(InputError):
                        cands.append(load_image(e.image))
            out.append(cands)
        return out


def resolve_model(model: str, model_dir: str | None, flag: str, storage_options: dict | None = None) -> str:
    """A local folder for ``model``: a path, an s3:// prefix (downloaded once), or a cached hub name."""
    if model.startswith("s3://"):
        import fsspec

        cache = Path(tempfile.gettempdir()) / "rag4dmc-weights" / hashlib.sha256(model.encode()).hexdigest()[:16]
        if not (cache / "model_index.json").exists() and not (cache / "config.json").exists():
            fs, path = fsspec.core.url_to_fs(model, **(storage_options or {}))
            if not fs.exists(path):
                raise GeneratorNotFoundError(model, model, flag)
            fs.get(path.rstrip("/") + "/", str(cache), recursive=True)
        return str(cache)
    for candidate in (Path(model), Path(model_dir or "") / model):
        if candidate.is_dir():
            return str(candidate)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(model, cache_dir=model_dir, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise GeneratorNotFoundError(model, model_dir or "the local Hugging Face cache", flag) from None


def _dtype(device: torch.device, precision: str) -> torch.dtype:
    if device.type != "cuda" or precision == "fp32":
        return torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float16


def blip2_prompt(example_text: str) -> str:
    """The paper's prompt: the retrieved caption as caption 1, the model writes caption 2."""
    return BLIP2_PROMPT.format(example=" ".join(example_text.split()))


class Blip2TextGenerator:
    """BLIP2 (any checkpoint) prompted with the retrieved example; n sampled captions per image."""

    RESOURCES = Resources(num_cpus=1.0, num_gpus=1.0, memory_gb=16.0, batch_size=8, gpu_batch_size=16)

    def __init__(self, model: str, model_dir: str | None = None, device: str = "auto", precision: str = "fp16",
                 max_new_tokens: int = 30, temperature: float = 1.0, top_p: float = 0.9, batch_size: int = 8):
        from transformers import AutoProcessor, Blip2ForConditionalGeneration

        path = resolve_model(model, model_dir, "--text-generator")
        self.device = pick_device(device)
        self.dtype = _dtype(self.device, precision)
        self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        self.model = Blip2ForConditionalGeneration.from_pretrained(path, local_files_only=True,
                                                                   torch_dtype=self.dtype).to(self.device).eval()
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.batch_size = batch_size
        self.name = f"blip2:{model}"

    @torch.inference_mode()
    def generate(self, images: list, examples: list[list[Example]], n: int, seed: int) -> list[list[str]]:
        out: list[list[str]] = []
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for s in range(0, len(images), self.batch_size):
            imgs, exs = images[s : s + self.batch_size], examples[s : s + self.batch_size]
            prompts = [blip2_prompt(ex[0].text if ex else "") for ex in exs]
            inputs = self.processor(images=imgs, text=prompts, return_tensors="pt", padding=True).to(self.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            ids = self.model.generate(**inputs, do_sample=True, num_return_sequences=n, top_p=self.top_p,
                                      temperature=self.temperature, max_new_tokens=self.max_new_tokens)
            texts = self.processor.batch_decode(ids, skip_special_tokens=True)
            for i, prompt in enumerate(prompts):
                cands = [_strip_prompt(t, prompt) for t in texts[i * n : (i + 1) * n]]
                out.append([c for c in cands if c])
        return out


def _strip_prompt(text: str, prompt: str) -> str:
    text = " ".join(text.split())
    prompt = " ".join(prompt.split())
    if text.startswith(prompt):
        text = text[len(prompt):]
    return text.split("Caption")[0].strip(" :")


class SdxlImageGenerator:
    """SDXL (any checkpoint): img2img from the retrieved example image, or text2img; n images per prompt."""

    RESOURCES = Resources(num_cpus=1.0, num_gpus=1.0, memory_gb=24.0, batch_size=2, gpu_batch_size=4)

    def __init__(self, model: str, model_dir: str | None = None, device: str = "auto", precision: str = "fp16",
                 mode: str = "img2img", strength: float = 0.6, steps: int = 30, guidance_scale: float = 5.0,
                 image_size: int = 512, batch_size: int = 4):
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

        path = resolve_model(model, model_dir, "--image-generator")
        self.device = pick_device(device)
        dtype = _dtype(self.device, precision)
        base = StableDiffusionXLPipeline.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
        base.set_progress_bar_config(disable=True)
        self.pipe = base if mode == "text2img" else StableDiffusionXLImg2ImgPipeline(**base.components)
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.mode, self.strength, self.steps = mode, strength, steps
        self.guidance_scale, self.image_size, self.batch_size = guidance_scale, image_size, batch_size
        self.name = f"sdxl:{model}:{mode}"

    @torch.inference_mode()
    def generate(self, texts: list[str], examples: list[list[Example]], n: int,
                 seed: int) -> list[list[Image.Image]]:
        out: list[list[Image.Image]] = []
        for s in range(0, len(texts), self.batch_size):
            prompts, exs = texts[s : s + self.batch_size], examples[s : s + self.batch_size]
            gens = [torch.Generator(device="cpu").manual_seed(seed + s + i * 7919 + j)
                    for i in range(len(prompts)) for j in range(n)]
            kwargs = {"prompt": prompts, "num_images_per_prompt": n, "num_inference_steps": self.steps,
                      "guidance_scale": self.guidance_scale, "generator": gens}
            if self.mode == "img2img":
                kwargs["image"] = [self._init_image(ex) for ex in exs]
                kwargs["strength"] = self.strength
            else:
                kwargs["height"] = kwargs["width"] = self.image_size
            images = self.pipe(**kwargs).images
            for i in range(len(prompts)):
                out.append([im.resize((self.image_size, self.image_size)) if im.size != (self.image_size,) * 2
                            else im for im in images[i * n : (i + 1) * n]])
        return out

    def _init_image(self, examples: list[Example]) -> Image.Image:
        for e in examples:
            if e.image:
                with contextlib.suppress(InputError):
                    return load_image(e.image).resize((self.image_size, self.image_size), Image.BICUBIC)
        return Image.new("RGB", (self.image_size, self.image_size), (127, 127, 127))


def text_generator_class(cfg: GeneratorConfig) -> type:
    return {"nn": NearestNeighbourTextGenerator, "blip2": Blip2TextGenerator}[cfg.text_backend]


def image_generator_class(cfg: GeneratorConfig) -> type:
    return {"nn": NearestNeighbourImageGenerator, "sdxl": SdxlImageGenerator}[cfg.image_backend]


def create_text_generator(cfg: GeneratorConfig) -> TextGenerator:
    """The configured image->text generator."""
    if cfg.text_backend == "nn":
        return NearestNeighbourTextGenerator()
    return Blip2TextGenerator(cfg.blip2_model, cfg.model_dir, cfg.device, cfg.precision, cfg.max_new_tokens,
                              cfg.temperature, cfg.top_p, cfg.batch_size)


def create_image_generator(cfg: GeneratorConfig) -> ImageGenerator:
    """The configured text->image generator."""
    if cfg.image_backend == "nn":
        return NearestNeighbourImageGenerator()
    return SdxlImageGenerator(cfg.sdxl_model, cfg.model_dir, cfg.device, cfg.precision, cfg.sdxl_mode,
                              cfg.strength, cfg.steps, cfg.guidance_scale, cfg.image_size, cfg.batch_size)

