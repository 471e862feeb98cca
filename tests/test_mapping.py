"""The bidirectional mapping MLP: learns the planted modality relation, deterministic, saves and loads."""

import numpy as np
import pytest
import torch

from rag4dmc.pipeline.config import MappingConfig
from rag4dmc.pipeline.core.knn import EmbeddingError
from rag4dmc.pipeline.core.mapping import CrossModalMapper, train_mapping
from rag4dmc.pipeline.core.mapping_arrays import MappingArrays
from rag4dmc.pipeline.kb.store import load_mapping
from tests.planted import unit

FAST = MappingConfig(hidden_dim=128, max_epochs=60, patience=8, batch_size=128, lr=3e-3)


def _pairs(n, d_img, d_txt, seed=0):
    """Text = a fixed nonlinear function of the image latent plus noise (a planted modality relation)."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 16))
    A = rng.normal(size=(16, d_img))
    B = rng.normal(size=(16, d_txt))
    z_img = unit(latent @ A + 0.1 * rng.normal(size=(n, d_img)))
    z_txt = unit(np.tanh(latent) @ B + 2.0 + 0.1 * rng.normal(size=(n, d_txt)))  # offset: the modality gap
    return z_img, z_txt


@pytest.mark.parametrize("d_img, d_txt", [(32, 32), (48, 24)])
def test_mapping_beats_identity_and_zero_maps_on_held_out_pairs(d_img, d_txt):
    z_img, z_txt = _pairs(2400, d_img, d_txt)
    model, report = train_mapping(z_img[:2000], z_txt[:2000], FAST)
    hi, ht = z_img[2000:], z_txt[2000:]
    cos_t = np.einsum("nd,nd->n", model.image_to_text(hi), ht).mean()
    cos_i = np.einsum("nd,nd->n", model.text_to_image(ht), hi).mean()
    mse_zero = 1.0  # ||0 - z||^2 for unit targets
    mse_t = ((model.image_to_text(hi) - ht) ** 2).sum(1).mean()
    assert cos_t > 0.8 and cos_i > 0.8
    assert mse_t < 0.3 * mse_zero
    if d_img == d_txt:
        cos_identity = np.einsum("nd,nd->n", hi, ht).mean()
        assert cos_t > cos_identity + 0.3
    assert report.best_epoch < report.epochs and report.n_val == 200


def test_equal_sizes_share_the_trunk_and_different_sizes_get_their_own_input_layers():
    shared = CrossModalMapper(32, 32, 16)
    split = CrossModalMapper(48, 24, 16)
    assert shared.in_image is shared.in_text
    assert split.in_image is not split.in_text
    assert split.to_text.out_features == 24 and split.to_image.out_features == 48


def test_training_is_deterministic_under_a_seed_and_early_stops():
    z_img, z_txt = _pairs(600, 16, 16, seed=3)
    cfg = FAST.model_copy(update={"max_epochs": 500, "patience": 3})
    m1, r1 = train_mapping(z_img, z_txt, cfg)
    m2, r2 = train_mapping(z_img, z_txt, cfg)
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert r1.val_loss == r2.val_loss
    assert r1.epochs < 500


@pytest.mark.parametrize("dims", [(20, 12), (16, 16)], ids=["two-towers", "shared-space"])
def test_save_and_load_round_trip(tmp_path, dims):
    z_img, z_txt = _pairs(300, *dims)
    model, _ = train_mapping(z_img, z_txt, FAST.model_copy(update={"max_epochs": 3}))
    model.save(tmp_path / "mapping.safetensors")
    loaded = CrossModalMapper.load(tmp_path / "mapping.safetensors")
    np.testing.assert_array_equal(model.image_to_text(z_img), loaded.image_to_text(z_img))
    np.testing.assert_array_equal(model.text_to_image(z_txt), loaded.text_to_image(z_txt))


@pytest.mark.parametrize("dims", [(20, 12), (16, 16)], ids=["two-towers", "shared-space"])
def test_the_numpy_mapping_gives_the_torch_modules_pseudo_embeddings(tmp_path, dims):
    """What a stored KB's queries use (MappingArrays, no torch) is the trained module's forward pass."""
    z_img, z_txt = _pairs(300, *dims)
    model, _ = train_mapping(z_img, z_txt, FAST.model_copy(update={"max_epochs": 5, "num_layers": 3}))
    model.save(tmp_path / "mapping.safetensors")
    arrays = MappingArrays.load(tmp_path / "mapping.safetensors")
    assert arrays.arch() == model.arch() and len(arrays.trunk) == 2
    np.testing.assert_allclose(arrays.image_to_text(z_img), model.image_to_text(z_img), atol=2e-6)
    np.testing.assert_allclose(arrays.text_to_image(z_txt), model.text_to_image(z_txt), atol=2e-6)
    with pytest.raises(EmbeddingError, match=f"expects {dims[0]}-d image embeddings"):
        arrays.image_to_text(z_img[:, :-1])
    arrays.save(tmp_path / "again.safetensors")  # a loaded KB saved again keeps the same weights
    np.testing.assert_array_equal(CrossModalMapper.load(tmp_path / "again.safetensors").image_to_text(z_img),
                                  model.image_to_text(z_img))


def test_a_format_3_torch_mapping_file_still_loads(tmp_path):
    z_img, z_txt = _pairs(200, 20, 12)
    model, _ = train_mapping(z_img, z_txt, FAST.model_copy(update={"max_epochs": 2}))
    torch.save({"arch": model.arch(), "state_dict": model.state_dict(), "extra": {}}, tmp_path / "mapping.pt")
    loaded = load_mapping(tmp_path / "mapping.pt")
    assert isinstance(loaded, CrossModalMapper)
    np.testing.assert_array_equal(loaded.image_to_text(z_img), model.image_to_text(z_img))


def test_a_file_that_is_not_a_mapping_is_refused_saying_so(tmp_path):
    from safetensors.numpy import save_file

    save_file({"w": np.zeros((2, 2), np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a rag4dmc mapping weights file"):
        MappingArrays.load(tmp_path / "other.safetensors")


def test_bad_inputs_are_refused_with_a_reason():
    z_img, z_txt = _pairs(50, 8, 8)
    with pytest.raises(EmbeddingError, match="paired rows"):
        train_mapping(z_img, z_txt[:40], FAST)
    with pytest.raises(EmbeddingError, match="at least"):
        train_mapping(z_img[:2], z_txt[:2], FAST)
    nan = z_img.copy()
    nan[0, 0] = np.nan
    with pytest.raises(EmbeddingError, match="NaN"):
        train_mapping(nan, z_txt, FAST)
    model = CrossModalMapper(8, 8, 16)
    with pytest.raises(EmbeddingError, match="expects 8-d"):
        model.image_to_text(np.ones((2, 9), np.float32))
