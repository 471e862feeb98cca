"""Frozen encoders. The lite towers are real pretrained models: photos of one subject cluster, paraphrases
cluster, and each tower agrees with its reference (the checkpoint's own ImageNet head, sentence-transformers).
Every encoder gives unit float32 rows that do not depend on batching; open_clip loads weights from exactly
where it is told (file, s3://, local-dir:, cached tag) and fails at once, with advice, when they are absent."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps
from skimage import data as photos

from rag4dmc.actors.encoders import (
    LITE_MEAN,
    LITE_STD,
    EncoderNotFoundError,
    LiteEncoder,
    OpenClipEncoder,
    describe_encoder,
    encoder_image_size,
    lite_image_tower,
    load_by_position,
    minilm_dir,
    resolve_checkpoint,
)
from rag4dmc.actors.factory import create_encoder, encoder_class
from rag4dmc.actors.images import resize_for_model
from rag4dmc.pipeline.config import EncoderConfig

SUBJECTS = ("chelsea", "coffee", "rocket", "astronaut", "camera", "coins", "hubble_deep_field",
            "immunohistochemistry")
IMAGENET_CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
IMAGENET_COFFEE = {504, 967, 968}  # coffee mug, espresso, cup
PARAPHRASES = [
    ("A cat is sleeping on the sofa.", "A kitten naps on the couch."),
    ("The rocket launched into space.", "A spacecraft lifted off toward orbit."),
    ("A cup of hot coffee on the table.", "A mug of espresso sits on a desk."),
    ("Children are playing football in the park.", "Kids kick a soccer ball around on the grass."),
    ("The stock market fell sharply today.", "Share prices dropped steeply this afternoon."),
]
TOL = 1e-5  # float32 round-off between batch shapes
TINY_CLIP = "rag4dmc-tiny-clip"
TINY_CLIP_CFG = {  # a 16-d CLIP: 1-layer ViT on 32px images, 1-layer text transformer over open_clip's BPE vocab
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
CACHED_TAG = ("ViT-B-32", "laion2b_s34b_b79k")  # hf_hub: laion/CLIP-ViT-B-32-laion2B-s34B-b79K/


def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(photos, name)()).convert("RGB")


def augmented(img: Image.Image, rng: np.random.Generator) -> list[Image.Image]:
    """Three views of one photo: an off-centre crop, a mirrored crop, a colour-jittered copy."""
    w, h = img.size

    def crop(frac: float) -> Image.Image:
        cw, ch = int(w * frac), int(h * frac)
        x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        return img.crop((x, y, x + cw, y + ch))

    jitter = ImageEnhance.Brightness(ImageEnhance.Color(img).enhance(rng.uniform(0.6, 1.4)))
    return [crop(0.8), ImageOps.mirror(crop(0.85)), jitter.enhance(rng.uniform(0.75, 1.25))]


def unit_rows(x: np.ndarray, dim: int) -> bool:
    return x.dtype == np.float32 and x.ndim == 2 and x.shape[1] == dim and np.allclose(
        np.linalg.norm(x, axis=1), 1.0, atol=TOL)


@pytest.fixture(scope="module")
def lite() -> LiteEncoder:
    torch.manual_seed(0)
    enc = create_encoder(EncoderConfig(backend="lite", device="cpu", batch_size=4))
    assert isinstance(enc, LiteEncoder) and enc.batch_size == 4
    return enc


@pytest.fixture(scope="module")
def subjects() -> list[Image.Image]:
    return [photo(name) for name in SUBJECTS]


# --- lite: meaning ---------------------------------------------------------------------------------------


def test_augmented_views_are_nearest_their_own_photo(lite, subjects):
    rng = np.random.default_rng(0)
    views, source = [], []
    for i, img in enumerate(subjects):
        for view in augmented(img, rng):
            views.append(view)
            source.append(i)
    sims = lite.encode_images(views) @ lite.encode_images(subjects).T
    assert sims.argmax(axis=1).tolist() == source
    own = sims[np.arange(len(views)), source]
    others = np.where(np.eye(len(subjects), dtype=bool)[source], -np.inf, sims).max(axis=1)
    assert np.all(own - others > 0.05)  # a margin, not a coin toss


def test_image_tower_is_the_checkpoints_imagenet_model(lite, subjects):
    """The pooled features the encoder normalises are the ones the checkpoint's own classifier reads, and
    that classifier recognises the photos: the weights loaded by position and the normalisation are right."""
    tower = lite_image_tower(num_classes=1000).eval()
    cat, coffee = subjects[SUBJECTS.index("chelsea")], subjects[SUBJECTS.index("coffee")]
    pixels = torch.from_numpy(np.stack([resize_for_model(im, lite.image_size) for im in (cat, coffee)]))
    x = (pixels.permute(0, 3, 1, 2).float() / 255 - torch.tensor(LITE_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        LITE_STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        pooled = tower.forward_head(tower.forward_features(x), pre_logits=True)
        labels = tower.get_classifier()(pooled).argmax(1).tolist()
    assert labels[0] in IMAGENET_CATS and labels[1] in IMAGENET_COFFEE
    expected = torch.nn.functional.normalize(pooled, dim=1).numpy()
    np.testing.assert_allclose(lite.encode_images([cat, coffee]), expected, atol=TOL)


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_the_fast_image_path_keeps_the_float32_reference_embeddings_of_real_photos(subjects, runtime):
    """ONNX Runtime (the CPU default), channels_last and small CPU micro-batches change only the speed: on real
    photos and their augmented views, in one 64-row batch, every embedding is within cosine 0.999 of the plain
    NCHW float32 torch forward."""
    enc = LiteEncoder(device="cpu", batch_size=64, cpu_runtime=runtime)
    assert (enc.onnx is not None) == (runtime == "onnxruntime")
    rng = np.random.default_rng(1)
    images = subjects + [view for img in subjects for view in augmented(img, rng)]
    pixels = np.stack([resize_for_model(im, enc.image_size) for im in images])
    x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - torch.tensor(LITE_MEAN).view(1, 3, 1, 1)) / \
        torch.tensor(LITE_STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        reference = torch.nn.functional.normalize(lite_image_tower().eval()(x), dim=1).numpy()
    cosine = (enc.encode_pixels(pixels) * reference).sum(axis=1)
    assert len(cosine) == 32 and cosine.min() >= 0.999


def test_a_failed_onnx_export_falls_back_to_torch_with_a_warning(subjects, tmp_path, monkeypatch, caplog):
    def broken_export(*args):
        raise RuntimeError("exporter broke")

    monkeypatch.setattr("rag4dmc.actors.onnx_module.ONNX_CACHE", tmp_path)  # nothing cached: the export must run
    monkeypatch.setattr("rag4dmc.actors.onnx_module.export_onnx", broken_export)
    with caplog.at_level("WARNING", logger="rag4dmc.actors.encoders"):
        enc = LiteEncoder(device="cpu", batch_size=4)
    assert enc.onnx is None and "exporter broke" in caplog.text and "cpu_runtime: torch" in caplog.text
    reference = LiteEncoder(device="cpu", batch_size=4, cpu_runtime="torch")
    np.testing.assert_allclose(enc.encode_images(subjects[:2]), reference.encode_images(subjects[:2]), atol=TOL)


def test_paraphrases_are_nearest_each_other(lite):
    texts = [t for pair in PARAPHRASES for t in pair]
    emb = lite.encode_texts(texts)
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    partner = [i ^ 1 for i in range(len(texts))]  # 0<->1, 2<->3, ...
    assert sims.argmax(axis=1).tolist() == partner


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_text_tower_matches_sentence_transformers(runtime):
    """In either runtime (the exported graph with the tokenizers library's tokens, or transformers in torch), in one
    padded batch with a text past the tower's 256 tokens, accents and an emoji: sentence-transformers' embeddings."""
    from sentence_transformers import SentenceTransformer

    enc = LiteEncoder(device="cpu", cpu_runtime=runtime, towers=("text",))
    assert (enc.text_onnx is not None) == (runtime == "onnxruntime")
    texts = [t for pair in PARAPHRASES for t in pair] + ["word", "a much longer sentence " * 30,
                                                         "Crème brûlée à la café 🍮", ""]
    reference = SentenceTransformer(minilm_dir(), device="cpu").encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(enc.encode_texts(texts), reference, atol=TOL)


def test_on_cpu_the_cached_lite_graphs_load_without_torch_timm_or_transformers(lite):
    """Once this machine has the two graphs (the ``lite`` fixture made them), an actor's lite encoder loads and
    embeds in ONNX Runtime alone: no torch (about 2 s a process), no timm, no transformers."""
    import os
    import subprocess
    import sys

    code = ("import json, sys\nfrom rag4dmc.actors.encoders import LiteEncoder\nimport numpy as np\n"
            "enc = LiteEncoder(device='auto')\n"
            "out = [enc.encode_texts(['a cat']).shape, enc.encode_pixels(np.zeros((1, 224, 224, 3), np.uint8)).shape]\n"
            "print(json.dumps({'shapes': out, 'loaded': sorted({'torch', 'timm', 'transformers'} & set(sys.modules))}))")
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert ran.returncode == 0, ran.stderr[-3000:]
    result = json.loads(ran.stdout.strip().splitlines()[-1])
    assert result == {"shapes": [[1, 384], [1, 1280]], "loaded": []}


# --- lite: contract --------------------------------------------------------------------------------------


def test_outputs_are_unit_float32_rows_of_the_declared_dims(lite, subjects):
    assert (lite.name, lite.image_dim, lite.text_dim, lite.image_size) == ("lite-effnet0-minilm", 1280, 384, 224)
    assert unit_rows(lite.encode_images(subjects[:2]), 1280)
    assert unit_rows(lite.encode_texts(["a photo of a cat"]), 384)
    assert lite.encode_images([]).shape == (0, 1280) and lite.encode_texts([]).shape == (0, 384)
    assert lite.encode_pixels(np.zeros((0, 224, 224, 3), np.uint8)).shape == (0, 1280)


def test_identical_inputs_give_identical_outputs(lite, subjects):
    assert np.array_equal(lite.encode_images(subjects[:3]), lite.encode_images(subjects[:3]))
    assert np.array_equal(lite.encode_texts(["same words"] * 2), lite.encode_texts(["same words"] * 2))
    twice = lite.encode_texts(["same words", "same words"])
    assert np.array_equal(twice[0], twice[1])


def test_batch_results_equal_one_by_one_results(lite, subjects):
    images = subjects[:6]  # more than batch_size (4): internal batches of 4 and 2
    together = lite.encode_images(images)
    alone = np.concatenate([lite.encode_images([im]) for im in images])
    np.testing.assert_allclose(together, alone, atol=TOL)
    texts = ["a", "a cat on a mat", "the quick brown fox jumps over the lazy dog", "x y", "rockets", "coffee"]
    np.testing.assert_allclose(lite.encode_texts(texts),
                               np.concatenate([lite.encode_texts([t]) for t in texts]), atol=TOL)


def test_encode_images_is_resize_then_encode_pixels(lite, subjects):
    pixels = np.stack([resize_for_model(im, lite.image_size) for im in subjects[:2]])
    assert np.array_equal(lite.encode_images(subjects[:2]), lite.encode_pixels(pixels))


def test_mixed_sizes_and_modes_all_encode(lite, subjects):
    cat = subjects[0]
    rgba = cat.convert("RGBA")  # opaque: the same picture
    gray = photo("camera")  # RGB-stacked grayscale
    images = [cat, rgba, cat.convert("P"), gray.convert("L"), gray, Image.new("1", (31, 7), 1),
              cat.resize((40, 900)), Image.new("RGB", (1, 1), (9, 9, 9))]
    emb = lite.encode_images(images)
    assert unit_rows(emb, 1280) and np.all(np.isfinite(emb))
    np.testing.assert_allclose(emb[1], emb[0], atol=TOL)
    np.testing.assert_allclose(emb[3], emb[4], atol=TOL)
    assert emb[2] @ emb[0] > 0.9  # a 256-colour palette keeps the picture


@pytest.mark.parametrize("tower", ["image", "text"])
def test_a_one_tower_encoder_loads_only_that_tower_and_embeds_as_both_towers_do(lite, subjects, tower):
    one = create_encoder(EncoderConfig(backend="lite", device="cpu", batch_size=4), towers=(tower,))
    other = "text" if tower == "image" else "image"
    assert one.towers == (tower,) and getattr(one, f"{other}_model") is None  # the other tower never loaded
    texts = ["a red bus parked on a wet street", "two dogs running in a sunny park"]
    if tower == "image":
        np.testing.assert_allclose(one.encode_images(subjects), lite.encode_images(subjects), atol=1e-5)
        with pytest.raises(RuntimeError, match=r"towers=\('image',\).*including 'text'"):
            one.encode_texts(texts)
    else:
        np.testing.assert_allclose(one.encode_texts(texts), lite.encode_texts(texts), atol=1e-5)
        with pytest.raises(RuntimeError, match=r"towers=\('text',\).*including 'image'"):
            one.encode_images(subjects)


def test_towers_must_name_image_or_text():
    with pytest.raises(ValueError, match="one or both of"):
        LiteEncoder(device="cpu", towers=("audio",))


def test_pixels_of_the_wrong_shape_are_refused(lite):
    with pytest.raises(ValueError, match=r"\[n, 224, 224, 3\]"):
        lite.encode_pixels(np.zeros((2, 32, 32, 3), np.uint8))


def test_load_by_position_maps_renamed_keys_and_checks_shapes():
    torch.manual_seed(0)
    source, target = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)), torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    renamed = {f"_layer{i}.{k.split('.')[-1]}": v for i, (k, v) in enumerate(source.state_dict().items())}
    load_by_position(target, {**renamed, "_fc.weight": torch.zeros(1)}, skip_prefixes=("_fc.",))
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    swapped = dict(reversed(list(renamed.items())))
    with pytest.raises(ValueError, match="shape"):
        load_by_position(target, swapped)
    with pytest.raises(ValueError, match="has 3 tensors, the model 4"):
        load_by_position(target, dict(list(renamed.items())[:3]))


# --- declarations and the factory ------------------------------------------------------------------------


def test_resources_are_declared_per_class():
    assert LiteEncoder.RESOURCES.num_gpus == 0 and LiteEncoder.RESOURCES.batch_size == 64
    clip = OpenClipEncoder.RESOURCES
    assert clip.num_gpus > 0 and clip.num_cpus >= 1 and clip.effective_batch_size() == 256
    assert encoder_class(EncoderConfig(backend="lite")) is LiteEncoder
    assert encoder_class(EncoderConfig(backend="open_clip")) is OpenClipEncoder


def test_lite_is_described_without_loading(lite):
    cfg = EncoderConfig(backend="lite")
    assert encoder_image_size(cfg) == lite.image_size
    assert describe_encoder(cfg) == {"name": lite.name, "image_dim": lite.image_dim, "text_dim": lite.text_dim}


# --- open_clip -------------------------------------------------------------------------------------------


def _clip_inputs(rng: np.random.Generator):
    pixels = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    return pixels, ["a cat", "a photo of a rocket", "coffee", "two dogs running on a beach", "x"]


def _reference(model, pixels: np.ndarray, texts: list[str], mean, std) -> tuple[np.ndarray, np.ndarray]:
    import open_clip

    x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) \
        / torch.tensor(std).view(1, 3, 1, 1)
    with torch.inference_mode():
        img = torch.nn.functional.normalize(model.encode_image(x), dim=1)
        txt = torch.nn.functional.normalize(model.encode_text(open_clip.get_tokenizer(TINY_CLIP)(texts)), dim=1)
    return img.numpy(), txt.numpy()


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> SimpleNamespace:
    """A registered tiny open_clip config, a random model saved as a checkpoint, and that model."""
    import open_clip

    folder = tmp_path_factory.mktemp("tiny_clip")
    (folder / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(folder / f"{TINY_CLIP}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP).eval()
    checkpoint = folder / "tiny.pt"
    torch.save(model.state_dict(), checkpoint)
    return SimpleNamespace(model=model, checkpoint=checkpoint)


def test_open_clip_loads_a_local_checkpoint(tiny_clip):
    import open_clip

    enc = OpenClipEncoder(TINY_CLIP, pretrained=str(tiny_clip.checkpoint), device="cpu", precision="fp32",
                          batch_size=2)
    assert (enc.image_dim, enc.text_dim, enc.image_size) == (16, 16, 32)
    pixels, texts = _clip_inputs(np.random.default_rng(0))
    img, txt = enc.encode_pixels(pixels), enc.encode_texts(texts)
    assert unit_rows(img, 16) and unit_rows(txt, 16)
    ref_img, ref_txt = _reference(tiny_clip.model, pixels, texts, open_clip.OPENAI_DATASET_MEAN,
                                  open_clip.OPENAI_DATASET_STD)
    np.testing.assert_allclose(img, ref_img, atol=TOL)  # batches of 2, 2, 1 against one batch of 5
    np.testing.assert_allclose(txt, ref_txt, atol=TOL)
    assert np.array_equal(enc.encode_pixels(pixels), img) and np.array_equal(enc.encode_texts(texts), txt)
    images = [Image.fromarray(p) for p in pixels]
    assert np.array_equal(enc.encode_images(images), img)  # already 32x32: resizing is the identity


def test_open_clip_without_weights_is_a_different_model(tiny_clip):
    pixels, texts = _clip_inputs(np.random.default_rng(0))
    loaded = OpenClipEncoder(TINY_CLIP, pretrained=str(tiny_clip.checkpoint), device="cpu")
    torch.manual_seed(1)
    fresh = OpenClipEncoder(TINY_CLIP, device="cpu")
    assert fresh.name.endswith(":random")
    assert not np.allclose(fresh.encode_texts(texts), loaded.encode_texts(texts), atol=1e-3)


def test_factory_builds_open_clip_from_config(tiny_clip):
    cfg = EncoderConfig(backend="open_clip", model_name=TINY_CLIP, pretrained=str(tiny_clip.checkpoint),
                        device="cpu", precision="fp32")
    enc = create_encoder(cfg)
    pixels, texts = _clip_inputs(np.random.default_rng(0))
    direct = OpenClipEncoder(TINY_CLIP, pretrained=str(tiny_clip.checkpoint), device="cpu")
    assert isinstance(enc, OpenClipEncoder) and np.array_equal(enc.encode_texts(texts), direct.encode_texts(texts))
    assert encoder_image_size(cfg) == enc.image_size
    assert describe_encoder(cfg) == {"name": enc.name, "image_dim": 16, "text_dim": 16}


def test_open_clip_fetches_an_s3_checkpoint_once(tiny_clip, s3_bucket, s3_server, tmp_path):
    import fsspec

    uri = f"{s3_bucket}/weights/tiny.pt"
    with fsspec.open(uri, "wb", **s3_server.storage_options) as f:
        f.write(tiny_clip.checkpoint.read_bytes())
    enc = OpenClipEncoder(TINY_CLIP, pretrained=uri, model_dir=str(tmp_path), device="cpu",
                          storage_options=s3_server.storage_options)
    local = OpenClipEncoder(TINY_CLIP, pretrained=str(tiny_clip.checkpoint), device="cpu")
    assert np.array_equal(enc.encode_texts(["a cat"]), local.encode_texts(["a cat"]))
    cached = list(tmp_path.rglob("tiny.pt"))
    assert len(cached) == 1 and not list(tmp_path.rglob("*.partial"))
    fsspec.filesystem("s3", **s3_server.storage_options).rm(uri)
    again = OpenClipEncoder(TINY_CLIP, pretrained=uri, model_dir=str(tmp_path), device="cpu",
                            storage_options=s3_server.storage_options)  # served from the cache
    assert np.array_equal(again.encode_texts(["a cat"]), local.encode_texts(["a cat"]))


def test_open_clip_loads_a_local_dir_with_its_preprocessing(tiny_clip, tmp_path):
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    (tmp_path / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": {"mean": mean, "std": std}}))
    (tmp_path / "open_clip_pytorch_model.bin").write_bytes(tiny_clip.checkpoint.read_bytes())
    enc = OpenClipEncoder(f"local-dir:{tmp_path}", device="cpu")
    pixels, texts = _clip_inputs(np.random.default_rng(1))
    ref_img, ref_txt = _reference(tiny_clip.model, pixels, texts, mean, std)
    np.testing.assert_allclose(enc.encode_pixels(pixels), ref_img, atol=TOL)
    np.testing.assert_allclose(enc.encode_texts(texts), ref_txt, atol=TOL)


def _hub_cache_file(cache: Path, repo: str, filename: str) -> Path:
    """Lay out ``cache`` as huggingface_hub does after a download of ``repo``'s ``filename``."""
    commit = "0" * 40
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    path = root / "snapshots" / commit / filename
    path.parent.mkdir(parents=True)
    path.write_bytes(b"weights")
    return path


@pytest.mark.parametrize("layout", ["plain", "hub-cache"])
def test_a_cached_tag_resolves_to_its_file_and_settings(tmp_path, layout):
    import open_clip

    if layout == "plain":
        expected = tmp_path / "open_clip_model.safetensors"
        expected.write_bytes(b"weights")
    else:
        expected = _hub_cache_file(tmp_path, "laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "open_clip_pytorch_model.bin")
    path, tag = resolve_checkpoint(*CACHED_TAG, model_dir=str(tmp_path))
    assert Path(path) == expected
    assert tag["mean"] == open_clip.get_pretrained_cfg(*CACHED_TAG)["mean"]


@pytest.fixture
def hub_online(monkeypatch):
    """Undo the suite's HF_HUB_OFFLINE=1: failing fast must not depend on the caller's environment."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("kwargs", "where"),
    [
        ({"model_name": "ViT-B-32", "pretrained": "/nonexistent/ckpt.pt"}, "/nonexistent/ckpt.pt"),
        ({"model_name": "ViT-B-32", "pretrained": "no-such-tag"}, "no-such-tag"),
        ({"model_name": CACHED_TAG[0], "pretrained": CACHED_TAG[1], "model_dir": "{tmp}"}, "{tmp}"),
        ({"model_name": "ViT-B-32", "pretrained": "openai"}, "the Hugging Face cache"),
        ({"model_name": "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"}, "the Hugging Face cache"),
        ({"model_name": "local-dir:/nonexistent/clip"}, "/nonexistent/clip"),
    ],
    ids=["missing-path", "unknown-tag", "uncached-tag-in-model-dir", "uncached-tag", "uncached-hf-hub",
         "missing-local-dir"],
)
def test_missing_weights_fail_fast_with_advice(hub_online, network_attempts, tmp_path, kwargs, where):
    kwargs = {k: v.format(tmp=tmp_path) for k, v in kwargs.items()}
    with pytest.raises(EncoderNotFoundError) as err:
        OpenClipEncoder(device="cpu", **kwargs)
    assert network_attempts == []  # it failed without trying a hub
    message = str(err.value)
    assert f"not found at {where.format(tmp=tmp_path)}" in message
    assert "pass --encoder lite for the offline default or point --model-dir at downloaded weights" in message


def test_missing_s3_checkpoint_fails_fast(tiny_clip, s3_bucket, s3_server, tmp_path):
    uri = f"{s3_bucket}/weights/absent.pt"
    with pytest.raises(EncoderNotFoundError, match=f"not found at {uri}"):
        OpenClipEncoder(TINY_CLIP, pretrained=uri, model_dir=str(tmp_path), device="cpu",
                        storage_options=s3_server.storage_options)
    assert not any(tmp_path.iterdir())


def test_unknown_architecture_and_precision_are_config_errors():
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Nope'"):
        OpenClipEncoder("ViT-Nope", device="cpu")
    with pytest.raises(ValueError, match="precision"):
        OpenClipEncoder("ViT-B-32", device="cpu", precision="fp8")


def test_a_process_that_can_see_no_gpu_picks_the_cpu_without_importing_torch(monkeypatch):
    import sys

    from rag4dmc.actors import devices

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # as Ray sets it for an actor given no GPU
    assert devices.gpu_possible() is False
    monkeypatch.setitem(sys.modules, "torch", None)  # importing torch now fails
    assert devices.resolve_device("auto") == "cpu" and devices.resolve_device("cpu") == "cpu"
    with pytest.raises(ImportError):
        devices.resolve_device("cuda")  # asking for a GPU asks torch
