"""Generators. The nearest-neighbour ones hand back exactly the top-n retrieved examples, in rank order, and
never invent. BLIP2 and SDXL are the real library classes at tiny sizes with random weights, saved to disk and
loaded back through the loading code users run: n candidates per query, seeded, batched without one query's
padding or seed leaking into another's. Missing weights fail at once, with advice, and never download."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rag4dmc.actors.factory import (
    create_image_generator,
    create_text_generator,
    image_generator_class,
    text_generator_class,
)
from rag4dmc.actors.generators import (
    BLIP2_PROMPT,
    DIFFUSERS_MARKER,
    NN_NAME,
    TEXT_FLAG,
    TRANSFORMERS_MARKER,
    Blip2TextGenerator,
    Example,
    GeneratorNotFoundError,
    NearestNeighbourImageGenerator,
    NearestNeighbourTextGenerator,
    SdxlImageGenerator,
    blip2_prompt,
    clean_caption,
    derive_seed,
    fetch_prefix,
    grounding_text,
    resolve_model,
)
from rag4dmc.pipeline.config import GeneratorConfig
from tests.tiny_models import CORPUS, MIN_CAPTION_TOKENS, TINY_IMAGE, save_tiny_blip2, save_tiny_sdxl

COLOURS = ((220, 30, 30), (30, 200, 40), (20, 40, 230), (240, 240, 20), (10, 10, 10))


# ------------------------------------------------------------------------------------------------ helpers


def png(colour: tuple[int, int, int], size: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def examples(texts: list[str], images: list[bytes | None] | None = None) -> list[Example]:
    """Retrieved examples, best first, with decreasing fusion scores."""
    images = images if images is not None else [None] * len(texts)
    return [Example(id=f"kb-{i}", text=t, image=im, score=1.0 - 0.1 * i)
            for i, (t, im) in enumerate(zip(texts, images, strict=True))]


def photo(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8))


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("generators")


@pytest.fixture(scope="module")
def blip2_path(tiny_dir: Path) -> Path:
    return save_tiny_blip2(tiny_dir)


@pytest.fixture(scope="module")
def sdxl_path(tiny_dir: Path) -> Path:
    return save_tiny_sdxl(tiny_dir)


@pytest.fixture(scope="module")
def blip2(blip2_path: Path) -> Blip2TextGenerator:
    return Blip2TextGenerator(str(blip2_path), device="cpu", max_new_tokens=MIN_CAPTION_TOKENS, batch_size=4)


@pytest.fixture(scope="module")
def sdxl_img2img(sdxl_path: Path) -> SdxlImageGenerator:
    return SdxlImageGenerator(str(sdxl_path), device="cpu", mode="img2img", steps=2, image_size=TINY_IMAGE,
                              strength=0.8, batch_size=2)


@pytest.fixture(scope="module")
def sdxl_text2img(sdxl_path: Path) -> SdxlImageGenerator:
    return SdxlImageGenerator(str(sdxl_path), device="cpu", mode="text2img", steps=2, image_size=TINY_IMAGE,
                              batch_size=2)


# ------------------------------------------------------------------------------------- nearest neighbour


def test_nn_text_candidates_are_the_top_n_texts_in_rank_order():
    ranked = examples(["first", "second", "third", "fourth", "fifth"])
    out = NearestNeighbourTextGenerator().generate([None, None], [ranked, ranked[2:]], n=3, seed=0)
    assert out == [["first", "second", "third"], ["third", "fourth", "fifth"]]


def test_nn_text_never_invents_fewer_examples_give_fewer_candidates_none_give_none():
    gen = NearestNeighbourTextGenerator()
    out = gen.generate([None] * 3, [examples(["only one"]), [], examples(["kept", "  ", "", "also kept"])],
                       n=4, seed=0)
    assert out == [["only one"], [], ["kept", "also kept"]]  # blank texts are no candidates


def test_nn_generators_are_deterministic_and_named_as_retrieval():
    ranked = examples(["a", "b", "c"], [png(c) for c in COLOURS[:3]])
    text, image = NearestNeighbourTextGenerator(), NearestNeighbourImageGenerator()
    assert text.name == image.name == NN_NAME == "nn-consensus-retrieval"
    assert text.generate([None], [ranked], 2, seed=1) == text.generate([None], [ranked], 2, seed=99)
    first, second = image.generate(["q"], [ranked], 2, seed=1), image.generate(["q"], [ranked], 2, seed=99)
    assert np.array_equal(pixels(first[0]), pixels(second[0]))


def test_nn_images_are_the_top_n_decoded_images_in_rank_order_skipping_undecodable():
    ranked = examples(list("abcde"), [png(COLOURS[0]), b"not an image", None, png(COLOURS[3]), png(COLOURS[4])])
    out = NearestNeighbourImageGenerator().generate(["q1", "q2", "q3"], [ranked, ranked[3:], []], n=4, seed=0)
    # top 4 are colour 0, garbage, no image, colour 3: two usable images, in that order
    assert [[im.getpixel((5, 5)) for im in cands] for cands in out] == [
        [COLOURS[0], COLOURS[3]], [COLOURS[3], COLOURS[4]], []]
    assert all(im.mode == "RGB" for im in out[0])


def test_a_batch_without_one_example_list_per_query_is_refused():
    with pytest.raises(ValueError, match="one per query"):
        NearestNeighbourTextGenerator().generate([None, None], [examples(["x"])], n=1, seed=0)
    with pytest.raises(ValueError, match="at least 1"):
        NearestNeighbourImageGenerator().generate(["q"], [examples(["x"])], n=0, seed=0)


# ------------------------------------------------------------------------------------------- pure parts


def test_blip2_prompt_is_the_papers_with_the_example_as_caption_one():
    prompt = blip2_prompt("  a red bus\n parked on a  street ")
    assert prompt == "Please write two captions of the image. Caption 1: a red bus parked on a street Caption 2:"
    assert prompt == BLIP2_PROMPT.format(example="a red bus parked on a street")


def test_clean_caption_strips_an_echoed_prompt_a_next_caption_and_extra_spaces():
    prompt = blip2_prompt("a red bus")
    assert clean_caption(f"{prompt}  a  double decker\nbus ", prompt) == "a double decker bus"
    assert clean_caption(" a yellow taxi Caption 3: a car", prompt) == "a yellow taxi"
    assert clean_caption("a dog caption 2 : a cat", prompt) == "a dog"
    assert clean_caption("captions of the image are hard", prompt) == "captions of the image are hard"
    assert clean_caption(prompt, prompt) == ""


def test_grounding_text_is_the_best_ranked_non_blank_text():
    assert grounding_text(examples(["", "  ", "a  cat\n", "a dog"])) == "a cat"
    assert grounding_text(examples(["", " "])) is None
    assert grounding_text([]) is None


def test_derived_seeds_differ_by_every_key_and_are_stable():
    seeds = {derive_seed(base, q, j) for base in (0, 1) for q in range(4) for j in range(4)}
    assert len(seeds) == 32
    assert derive_seed(7, 2, 3) == derive_seed(7, 2, 3)
    assert all(0 <= s < 2**31 for s in seeds)


# ---------------------------------------------------------------------------------------------- loading


def test_a_missing_local_model_fails_at_once_naming_where_and_the_way_out(tmp_path: Path, network_attempts):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(GeneratorNotFoundError) as err:
        Blip2TextGenerator(missing, device="cpu")
    assert network_attempts == []
    assert missing in str(err.value) and "--text-generator nn" in str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    with pytest.raises(GeneratorNotFoundError, match="--image-generator nn"):
        SdxlImageGenerator(missing, device="cpu")


def test_an_uncached_hub_name_fails_at_once_without_downloading(tmp_path: Path, network_attempts):
    cfg = GeneratorConfig(text_backend="blip2", image_backend="sdxl", model_dir=str(tmp_path), device="cpu")
    with pytest.raises(GeneratorNotFoundError, match="Salesforce/blip2-opt-2.7b"):
        create_text_generator(cfg)
    with pytest.raises(GeneratorNotFoundError, match="stabilityai/stable-diffusion-xl-base-1.0"):
        create_image_generator(cfg)
    assert network_attempts == []
    assert list(tmp_path.iterdir()) == []  # nothing was fetched into the cache folder


def test_a_folder_without_a_checkpoint_is_not_taken_for_one(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(GeneratorNotFoundError, match=f"no {TRANSFORMERS_MARKER}"):
        resolve_model(str(tmp_path / "empty"), None, TRANSFORMERS_MARKER, TEXT_FLAG)


def test_a_model_name_resolves_inside_model_dir_and_in_its_hub_cache_layout(tmp_path: Path):
    (tmp_path / "org" / "plain").mkdir(parents=True)
    (tmp_path / "org" / "plain" / DIFFUSERS_MARKER).write_text("{}")
    assert resolve_model("org/plain", str(tmp_path), DIFFUSERS_MARKER, TEXT_FLAG) == str(tmp_path / "org" / "plain")
    snapshot = tmp_path / "models--org--cached" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / TRANSFORMERS_MARKER).write_text("{}")
    (tmp_path / "models--org--cached" / "refs").mkdir()
    (tmp_path / "models--org--cached" / "refs" / "main").write_text("a" * 40)
    assert Path(resolve_model("org/cached", str(tmp_path), TRANSFORMERS_MARKER, TEXT_FLAG)) == snapshot


def test_an_s3_checkpoint_is_downloaded_once_and_loads(blip2_path: Path, s3_bucket: str, s3_server,
                                                       tmp_path: Path):
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_server.storage_options)
    uri = f"{s3_bucket}/models/blip2"
    fs.put(f"{blip2_path}/", uri.removeprefix("s3://"), recursive=True)
    cache = tmp_path / "weights"
    gen = Blip2TextGenerator(uri, model_dir=str(cache), device="cpu", max_new_tokens=MIN_CAPTION_TOKENS,
                             storage_options=s3_server.storage_options)
    assert gen.name == f"blip2:{uri}"
    local = Path(fetch_prefix(uri, str(cache), TRANSFORMERS_MARKER, TEXT_FLAG, s3_server.storage_options))
    assert sorted(p.name for p in local.iterdir()) == sorted(p.name for p in blip2_path.iterdir())
    assert [p for p in cache.iterdir() if ".partial-" in p.name] == []
    fs.rm(uri.removeprefix("s3://"), recursive=True)  # a second load reads the local copy only
    assert fetch_prefix(uri, str(cache), TRANSFORMERS_MARKER, TEXT_FLAG, s3_server.storage_options) == str(local)
    with pytest.raises(GeneratorNotFoundError, match="no config.json under that prefix"):
        fetch_prefix(f"{s3_bucket}/models/absent", str(cache), TRANSFORMERS_MARKER, TEXT_FLAG,
                     s3_server.storage_options)


# ------------------------------------------------------------------------------------------------ BLIP2


def test_blip2_gives_n_caption_strings_per_image_across_batches(blip2: Blip2TextGenerator, blip2_path: Path):
    queries = [photo(i) for i in range(6)]  # 6 queries, batches of 4: two generate calls
    grounded = [examples([CORPUS[1 + i % 4]]) for i in range(6)]
    out = blip2.generate(queries, grounded, n=3, seed=0)
    assert len(out) == 6
    assert all(len(cands) == 3 and all(isinstance(c, str) and c == c.strip() and c for c in cands)
               for cands in out)
    assert blip2.name == f"blip2:{blip2_path}"


def test_blip2_is_deterministic_under_a_seed_and_varies_with_it(blip2: Blip2TextGenerator):
    queries, grounded = [photo(1), photo(2)], [examples([CORPUS[1]]), examples([CORPUS[2]])]
    first = blip2.generate(queries, grounded, n=3, seed=5)
    assert blip2.generate(queries, grounded, n=3, seed=5) == first
    assert blip2.generate(queries, grounded, n=3, seed=6) != first


def test_blip2_leaves_the_global_torch_rng_alone(blip2: Blip2TextGenerator):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    blip2.generate([photo(0)], [examples([CORPUS[1]])], n=2, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_blip2_skips_queries_without_a_retrieved_caption_and_serves_the_rest(blip2: Blip2TextGenerator):
    out = blip2.generate([photo(0), photo(1), photo(2)], [examples([CORPUS[1]]), [], examples(["  ", CORPUS[3]])],
                         n=2, seed=0)
    assert [len(c) for c in out] == [2, 0, 2]


def test_blip2_pads_prompts_so_a_query_decodes_the_same_alone_or_beside_a_longer_one(blip2_path: Path):
    greedy = Blip2TextGenerator(str(blip2_path), device="cpu", max_new_tokens=MIN_CAPTION_TOKENS, top_p=1e-6)
    short, long = examples(["a dog"]), examples(["an old man reading by the window on a wet street"])
    alone = greedy.generate([photo(3)], [short], n=1, seed=0)
    together = greedy.generate([photo(3), photo(4)], [short, long], n=1, seed=0)
    assert together[0] == alone[0]  # wrongly padded prompts would shift where generation starts


def test_blip2_captions_depend_on_the_retrieved_example(blip2_path: Path):
    # Same image, same seed: only the retrieved caption in the prompt differs, so different samples can only
    # come from the prompt carrying the example into the model.
    sampler = Blip2TextGenerator(str(blip2_path), device="cpu", max_new_tokens=MIN_CAPTION_TOKENS, top_p=1.0)
    image = photo(7)
    captions = {sampler.generate([image], [examples([CORPUS[k]])], n=1, seed=0)[0][0] for k in range(1, 5)}
    assert len(captions) > 1


# ------------------------------------------------------------------------------------------------- SDXL


@pytest.mark.parametrize("mode", ["img2img", "text2img"])
def test_sdxl_gives_n_images_of_the_configured_size_per_prompt(mode: str, sdxl_img2img, sdxl_text2img,
                                                               sdxl_path: Path):
    gen = sdxl_img2img if mode == "img2img" else sdxl_text2img
    grounded = [examples(["x"], [png(COLOURS[i])]) for i in range(3)]  # 3 prompts, batches of 2
    out = gen.generate(["a red bus", "two dogs", "a bowl of fruit"], grounded, n=2, seed=0)
    assert [len(c) for c in out] == [2, 2, 2]
    assert all(isinstance(im, Image.Image) and im.size == (TINY_IMAGE, TINY_IMAGE) and im.mode == "RGB"
               for c in out for im in c)
    assert gen.name == f"sdxl:{sdxl_path}"


@pytest.mark.parametrize("mode", ["img2img", "text2img"])
def test_sdxl_is_deterministic_under_a_seed_and_varies_with_it(mode: str, sdxl_img2img, sdxl_text2img):
    gen = sdxl_img2img if mode == "img2img" else sdxl_text2img
    texts, grounded = ["a red bus", "two dogs"], [examples(["x"], [png(COLOURS[i])]) for i in range(2)]
    first = pixels([im for c in gen.generate(texts, grounded, n=2, seed=3) for im in c])
    again = pixels([im for c in gen.generate(texts, grounded, n=2, seed=3) for im in c])
    other = pixels([im for c in gen.generate(texts, grounded, n=2, seed=4) for im in c])
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    assert not np.array_equal(first[0], first[1])  # the n candidates of a prompt are different draws


def test_sdxl_candidates_are_seeded_per_query_not_per_batch(sdxl_text2img: SdxlImageGenerator):
    grounded = [examples(["x"]), examples(["y"]), examples(["z"])]
    alone = pixels(sdxl_text2img.generate(["a red bus"], grounded[:1], n=2, seed=0)[0])
    batched = pixels(sdxl_text2img.generate(["a red bus", "two dogs", "a cat"], grounded, n=2, seed=0)[0])
    assert np.abs(alone - batched).max() <= 1  # the same draws; at most float round-off between batch shapes


def test_img2img_starts_from_the_retrieved_image_and_text2img_ignores_it(sdxl_img2img, sdxl_text2img):
    red, blue = examples(["x"], [png(COLOURS[0])]), examples(["x"], [png(COLOURS[2])])
    from_red = pixels(sdxl_img2img.generate(["a bus"], [red], n=1, seed=0)[0])
    from_blue = pixels(sdxl_img2img.generate(["a bus"], [blue], n=1, seed=0)[0])
    assert not np.array_equal(from_red, from_blue)
    plain_red = pixels(sdxl_text2img.generate(["a bus"], [red], n=1, seed=0)[0])
    plain_blue = pixels(sdxl_text2img.generate(["a bus"], [blue], n=1, seed=0)[0])
    assert np.array_equal(plain_red, plain_blue)


def test_img2img_uses_the_best_image_that_decodes_and_skips_queries_with_none(sdxl_img2img):
    broken_first = examples(["x", "y"], [b"garbage", png(COLOURS[1])])
    good_first = examples(["y"], [png(COLOURS[1])])
    out = sdxl_img2img.generate(["a", "a", "b", "  "], [broken_first, good_first, examples(["z"]), good_first],
                                n=2, seed=0)
    assert [len(c) for c in out] == [2, 2, 0, 0]  # no usable image; blank prompt
    # query 0 starts from the same image as query 1 would at query index 0
    assert np.abs(pixels(out[0]) - pixels(sdxl_img2img.generate(["a"], [good_first], 2, 0)[0])).max() <= 1


def test_sdxl_refuses_settings_it_cannot_honour(sdxl_path: Path):
    with pytest.raises(ValueError, match="mode"):
        SdxlImageGenerator(str(sdxl_path), device="cpu", mode="inpaint")
    with pytest.raises(ValueError, match="multiple of 8"):
        SdxlImageGenerator(str(sdxl_path), device="cpu", image_size=30)


# ---------------------------------------------------------------------------------------------- factory


def test_the_factory_builds_what_the_config_names(blip2_path: Path, sdxl_path: Path):
    assert isinstance(create_text_generator(GeneratorConfig()), NearestNeighbourTextGenerator)
    assert isinstance(create_image_generator(GeneratorConfig()), NearestNeighbourImageGenerator)
    cfg = GeneratorConfig(text_backend="blip2", image_backend="sdxl", blip2_model=str(blip2_path),
                          sdxl_model=str(sdxl_path), device="cpu", steps=2, image_size=TINY_IMAGE,
                          sdxl_mode="text2img", max_new_tokens=MIN_CAPTION_TOKENS)
    text, image = create_text_generator(cfg), create_image_generator(cfg)
    assert isinstance(text, text_generator_class(cfg)) and text.name == f"blip2:{blip2_path}"
    assert isinstance(image, image_generator_class(cfg)) and image.name == f"sdxl:{sdxl_path}"
    assert image.mode == "text2img" and image.steps == 2
    assert len(image.generate(["a bus"], [examples(["x"])], n=cfg.n_candidates, seed=0)[0]) == cfg.n_candidates


def test_model_generators_ask_for_a_gpu_and_the_nn_ones_do_not():
    from rag4dmc.actors.encoders import OpenClipEncoder

    # each generator leaves room on its GPU for a CLIP embedder beside it, and two generators never share one
    for gen in (Blip2TextGenerator, SdxlImageGenerator):
        assert 0.5 < gen.RESOURCES.num_gpus < 1 and gen.RESOURCES.num_gpus + OpenClipEncoder.RESOURCES.num_gpus <= 1
    assert NearestNeighbourTextGenerator.RESOURCES.num_gpus == NearestNeighbourImageGenerator.RESOURCES.num_gpus == 0
    assert SdxlImageGenerator.RESOURCES.gpu_batch_size < Blip2TextGenerator.RESOURCES.gpu_batch_size
