"""Stand-in GPU stages (``rag4dmc.actors.standin``): off by default; with ``RAG4DMC_STANDIN`` set, the factories hand out
classes that declare the GPU models' resources, hold their actor for the scaled per-row cost and return cheap,
deterministic results. The sleep is checked by its arguments (a recording ``hold``), never by the clock."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rag4dmc.actors import encoders, factory, generators, standin
from rag4dmc.actors.embed import EmbedQueries
from rag4dmc.actors.generators import Example, NearestNeighbourImageGenerator, NearestNeighbourTextGenerator
from rag4dmc.pipeline.config import EncoderConfig, GeneratorConfig
from rag4dmc.pipeline.demo.corpus import make_internal

LITE = EncoderConfig()
OPEN_CLIP = EncoderConfig(backend="open_clip", model_name="ViT-L-14")
NN = GeneratorConfig()
MODELS = GeneratorConfig(text_backend="blip2", image_backend="sdxl")


@pytest.fixture
def held(monkeypatch) -> list[float]:
    """The seconds each stand-in call held its actor for, in order (nothing sleeps)."""
    calls: list[float] = []
    monkeypatch.setattr(standin, "_sleep", calls.append)
    return calls


@pytest.fixture
def on(monkeypatch):
    """Stand-ins on at a given scale for this test."""
    def set_scale(scale: float = 1.0) -> None:
        monkeypatch.setenv(standin.ENV, json.dumps({"scale": scale}))
    set_scale()
    return set_scale


def _examples(n_rows: int, per_row: int = 3) -> tuple[list[str], list[list[Example]]]:
    table = make_internal(n_rows * per_row, seed=3)
    texts, images = table.column("text").to_pylist(), table.column("image").to_pylist()
    examples = [[Example(id=f"e{i * per_row + j}", text=texts[i * per_row + j], image=images[i * per_row + j],
                         score=1.0 - j / 10) for j in range(per_row)] for i in range(n_rows)]
    return [f"query {i}" for i in range(n_rows)], examples


def test_off_by_default_the_factories_return_the_configured_classes(monkeypatch):
    monkeypatch.delenv(standin.ENV, raising=False)
    assert not standin.enabled()
    assert factory.encoder_class(LITE) is encoders.LiteEncoder
    assert factory.encoder_class(OPEN_CLIP) is encoders.OpenClipEncoder
    assert factory.text_generator_class(NN) is NearestNeighbourTextGenerator
    assert factory.image_generator_class(NN) is NearestNeighbourImageGenerator
    assert factory.text_generator_class(MODELS) is generators.Blip2TextGenerator
    assert factory.image_generator_class(MODELS) is generators.SdxlImageGenerator
    assert isinstance(factory.create_text_generator(NN), NearestNeighbourTextGenerator)
    assert isinstance(factory.create_image_generator(NN), NearestNeighbourImageGenerator)


@pytest.mark.parametrize("cfg", [LITE, OPEN_CLIP], ids=["lite", "open_clip"])
def test_on_every_factory_returns_a_standin_whatever_the_config(on, cfg):
    assert standin.enabled()
    assert factory.encoder_class(cfg) is standin.StandinEncoder
    assert isinstance(factory.create_encoder(cfg), standin.StandinEncoder)
    for gen in (NN, MODELS):
        assert factory.text_generator_class(gen) is standin.StandinTextGenerator
        assert factory.image_generator_class(gen) is standin.StandinImageGenerator
        assert isinstance(factory.create_text_generator(gen), standin.StandinTextGenerator)
        assert isinstance(factory.create_image_generator(gen), standin.StandinImageGenerator)


def test_each_call_is_logged_with_its_role_rows_and_times(on, held, monkeypatch, tmp_path):
    monkeypatch.setenv(standin.ENV, json.dumps({"scale": 0.5, "log": str(tmp_path / "holds")}))
    enc = factory.create_encoder(LITE)
    enc.encode_texts(["a", "b", "c"])
    texts, examples = _examples(2)
    factory.create_image_generator(NN).generate_indexed(texts, examples, 2, seed=0)
    lines = sorted(line.split() for f in (tmp_path / "holds").iterdir() for line in f.read_text().splitlines())
    # the node the call ran on: this process's Ray node where an earlier test left Ray running, else "-"
    import ray
    here = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "-"
    assert [(role, int(rows), node) for role, rows, _, _, _, node in lines] == [("encoder", 3, here),
                                                                                ("image_generator", 2, here)]
    assert all(float(start) <= float(end) for _, _, start, end, _, _ in lines)
    assert len(held) == 2


def test_a_bad_value_fails_loudly(monkeypatch):
    monkeypatch.setenv(standin.ENV, "scale=0.1")
    with pytest.raises(ValueError, match="not JSON"):
        standin.enabled()
    monkeypatch.setenv(standin.ENV, json.dumps({"scale": 0}))
    with pytest.raises(ValueError, match="scale must be a number > 0"):
        standin.enabled()
    monkeypatch.setenv(standin.ENV, json.dumps({"speed": 2}))
    with pytest.raises(ValueError, match="fields: scale, log"):
        standin.enabled()


@pytest.mark.parametrize(("standin_class", "real_class"), [
    (standin.StandinEncoder, encoders.OpenClipEncoder),
    (standin.StandinTextGenerator, generators.Blip2TextGenerator),
    (standin.StandinImageGenerator, generators.SdxlImageGenerator),
])
def test_standins_declare_the_gpu_models_resources_with_the_cost_scaled(on, standin_class, real_class):
    on(0.01)
    got, real = standin_class.RESOURCES, real_class.RESOURCES
    assert got.num_gpus == real.num_gpus > 0
    assert (got.num_cpus, got.memory_gb, got.gpu_batch_size) == (real.num_cpus, real.memory_gb, real.gpu_batch_size)
    assert got.seconds_per_row == pytest.approx(real.seconds_per_row * 0.01)
    on(2.0)  # read per access: a new scale applies at once
    assert standin_class.RESOURCES.seconds_per_row == pytest.approx(real.seconds_per_row * 2.0)


def test_the_embed_stage_asks_for_a_gpu_with_standins_on(on, monkeypatch):
    assert EmbedQueries(LITE, "image").RESOURCES.num_gpus == encoders.OpenClipEncoder.RESOURCES.num_gpus > 0
    monkeypatch.delenv(standin.ENV)
    assert EmbedQueries(LITE, "image").RESOURCES.num_gpus == 0


@pytest.mark.parametrize("cfg", [LITE, OPEN_CLIP], ids=["lite", "open_clip"])
def test_embeddings_are_deterministic_unit_rows_of_the_configured_dims(on, held, cfg):
    described = encoders.describe_encoder(cfg)
    enc = factory.create_encoder(cfg)
    assert (enc.image_dim, enc.text_dim) == (described["image_dim"], described["text_dim"])
    assert enc.image_size == encoders.encoder_image_size(cfg)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, enc.image_size, enc.image_size, 3), dtype=np.uint8)
    texts = ["a red circle", "two blue squares", "a red circle"]
    img, txt = enc.encode_pixels(pixels), enc.encode_texts(texts)
    assert img.shape == (5, described["image_dim"]) and txt.shape == (3, described["text_dim"])
    assert img.dtype == txt.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1, rtol=1e-5)
    again = factory.create_encoder(cfg)  # another actor: the same vectors
    np.testing.assert_array_equal(again.encode_pixels(pixels), img)
    np.testing.assert_array_equal(txt[0], txt[2])
    assert not np.allclose(txt[0], txt[1])
    np.testing.assert_array_equal(enc.encode_pixels(pixels[2:3]), img[2:3])  # a row's vector ignores its batch
    assert enc.encode_pixels(pixels[:0]).shape == (0, described["image_dim"])
    with pytest.raises(ValueError, match="pixels must be"):
        enc.encode_pixels(pixels[:, :8])


def test_the_encoder_holds_its_gpu_for_the_scaled_time_per_row(on, held):
    on(0.5)
    enc = factory.create_encoder(LITE)
    per_row = encoders.OpenClipEncoder.RESOURCES.seconds_per_row * 0.5
    enc.encode_pixels(np.zeros((7, enc.image_size, enc.image_size, 3), np.uint8))
    enc.encode_texts(["x"] * 10)
    assert held == pytest.approx([7 * per_row, 10 * per_row * standin.TEXT_COST_RATIO])


@pytest.mark.parametrize(("create", "nn_class", "real_class", "queries"), [
    (factory.create_text_generator, NearestNeighbourTextGenerator, generators.Blip2TextGenerator, "images"),
    (factory.create_image_generator, NearestNeighbourImageGenerator, generators.SdxlImageGenerator, "texts"),
], ids=["text", "image"])
def test_generators_return_the_neighbours_candidates_after_the_scaled_sleep(on, held, create, nn_class, real_class,
                                                                           queries):
    on(0.1)
    texts, examples = _examples(4)
    q = [None] * 4 if queries == "images" else texts
    gen, nn = create(MODELS), nn_class()
    got, want = gen.generate_indexed(q, examples, 2, seed=0), nn.generate_indexed(q, examples, 2, seed=0)
    assert [[i for i, _ in row] for row in got] == [[i for i, _ in row] for row in want] == [[0, 1]] * 4
    plain = gen.generate(q[:3], examples[:3], 3, seed=0)
    assert [len(row) for row in plain] == [3, 3, 3]
    assert gen.name == f"standin:{nn.name}"
    per_row = real_class.RESOURCES.seconds_per_row * 0.1
    assert held == pytest.approx([4 * per_row, 3 * per_row])


def test_off_nothing_is_held(monkeypatch, held):
    monkeypatch.delenv(standin.ENV, raising=False)
    texts, examples = _examples(2)
    factory.create_text_generator(NN).generate_indexed([None, None], examples, 2, seed=0)
    factory.create_image_generator(NN).generate_indexed(texts, examples, 2, seed=0)
    assert held == []


def test_gpu_seconds_per_row_weights_each_direction_by_its_share(on):
    on(2.0)
    cost = standin.gpu_seconds_per_row(share_i2t=0.25)
    enc, cap, paint = (c.RESOURCES.seconds_per_row for c in
                       (encoders.OpenClipEncoder, generators.Blip2TextGenerator, generators.SdxlImageGenerator))
    assert cost == pytest.approx({"embed:i2t": 0.25 * 2 * enc, "generate:i2t": 0.25 * 2 * cap,
                                  "embed:t2i": 0.75 * 2 * enc * standin.TEXT_COST_RATIO,
                                  "generate:t2i": 0.75 * 2 * paint})
