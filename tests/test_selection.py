"""Candidate selection: s_T = l1*cos + l2*BLEU, s_I = l1*cos - l2*NIQE, NIQE parameters read offline."""

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from rag4dmc.actors.niqe import NIQE_MIN_SIDE, NiqeScorer
from rag4dmc.pipeline.config import SelectionConfig
from rag4dmc.pipeline.core.selection import (
    candidate_cosines,
    consensus_bleu,
    image_score,
    select_image,
    select_text,
    sentence_bleu,
    text_score,
)
from rag4dmc.pipeline.setup_data import NIQE_ENV, NiqeParamsMissing, installed_locations, niqe_params_path


def test_sentence_bleu_is_scaled_to_unit_range():
    assert sentence_bleu("a red circle on the left", "a red circle on the left") == pytest.approx(1.0)
    assert sentence_bleu("purple elephants dancing", "a red circle on the left") < 0.05
    assert sentence_bleu("", "anything") == 0.0


def test_text_score_is_the_weighted_sum_of_cosine_and_bleu_against_the_example():
    cands = ["a red circle on the left", "two blue squares", "a red circle"]
    emb = np.array([[1, 0], [0, 1], [0.6, 0.8]], np.float32)
    cos = candidate_cosines(emb, np.array([0, 1], np.float32))
    cfg = SelectionConfig(lambda_cos=1.0, lambda_quality=0.5)
    s = select_text(cands, cos, cfg, reference="a red circle on the left")
    bleu = np.array([sentence_bleu(c, "a red circle on the left") for c in cands])
    np.testing.assert_allclose(s, np.array([0.0, 1.0, 0.8]) + 0.5 * bleu, atol=1e-5)
    only_cos = select_text(cands, cos, SelectionConfig(lambda_quality=0.0), reference="a red circle on the left")
    assert int(np.argmax(only_cos)) == 1


def test_retrieved_candidates_score_consensus_and_the_fused_retrieval_score():
    """Nearest-neighbour candidates are KB entries: BLEU is their agreement, and sim_fuse can weigh in."""
    cands = ["a red apple", "a red apple on a table", "a green pear"]
    cross = np.array([0.50, 0.40, 0.55], np.float32)
    fused = np.array([0.9, 0.2, 0.1], np.float32)
    paper = select_text(cands, cross, SelectionConfig(lambda_quality=0.0))
    assert int(np.argmax(paper)) == 2  # the cross term alone
    consensus = select_text(cands, cross, SelectionConfig(lambda_quality=1.0))
    np.testing.assert_allclose(consensus, cross + consensus_bleu(cands), atol=1e-6)
    assert int(np.argmax(consensus)) in (0, 1)  # the pear agrees with nobody
    weighted = select_text(cands, cross, SelectionConfig(lambda_quality=0.0, lambda_retrieval=2.0), fused=fused)
    np.testing.assert_allclose(weighted, cross + 2.0 * fused, atol=1e-6)
    assert int(np.argmax(weighted)) == 0  # the best-retrieved entry, which the paper's score ignores
    # generated candidates have no retrieval score: the weight does nothing without one
    np.testing.assert_allclose(text_score(cross, np.zeros(3), SelectionConfig(lambda_retrieval=2.0)),
                               text_score(cross, np.zeros(3), SelectionConfig()))


def test_image_score_penalises_niqe():
    cfg = SelectionConfig(lambda_cos=1, lambda_quality=1, niqe_scale=0.1)
    s = select_image(np.array([1.0, 1.0]), np.array([3.0, 30.0]), cfg)
    np.testing.assert_allclose(s, [1 - 0.3, 1 - 3.0], atol=1e-6)
    np.testing.assert_allclose(select_image(np.array([0.3, 0.2]), None, cfg), [0.3, 0.2])
    fused = select_image(np.array([0.3, 0.3]), np.array([10.0, 10.0]), cfg.model_copy(update={"lambda_retrieval": 1.0}),
                         fused=np.array([0.5, 0.1]))
    np.testing.assert_allclose(fused, [0.3 - 1.0 + 0.5, 0.3 - 1.0 + 0.1], atol=1e-6)


@pytest.fixture(scope="module")
def niqe():
    return NiqeScorer()  # the parameters found as users find them: installed by `rag4dmc setup` (make env)


def test_niqe_ranks_a_natural_photo_above_noise_and_blur(niqe):
    from skimage import data

    photo = Image.fromarray(data.astronaut()).resize((256, 256))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    blurred = photo.filter(ImageFilter.GaussianBlur(6))
    scores = niqe([photo, noise, blurred])
    assert scores[0] < scores[1] and scores[0] < scores[2]


def test_niqe_reads_npz_and_mat_alike(niqe, tmp_path):
    import scipy.io

    p = np.load(niqe.params_path)
    mat = tmp_path / "niqe.mat"
    scipy.io.savemat(mat, {"mu_prisparam": p["mu_pris_param"], "cov_prisparam": p["cov_pris_param"]})
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (96, 96, 3), dtype=np.uint8))
    np.testing.assert_allclose(NiqeScorer(str(mat))([img]), niqe([img]), rtol=1e-5)


def test_missing_niqe_parameters_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(NiqeParamsMissing, match="selection.niqe_params"):
        NiqeScorer(str(tmp_path / "nope.npz"))
    monkeypatch.setenv(NIQE_ENV, str(tmp_path / "gone.npz"))
    with pytest.raises(NiqeParamsMissing, match=NIQE_ENV):
        niqe_params_path(None)
    monkeypatch.delenv(NIQE_ENV)
    monkeypatch.setattr("rag4dmc.pipeline.setup_data.installed_locations", lambda: [tmp_path / "a.npz", tmp_path / "b.npz"])
    with pytest.raises(NiqeParamsMissing, match="run `rag4dmc setup`.*--image-quality none"):
        niqe_params_path(None)


def test_niqe_parameters_are_found_by_key_then_environment_then_installed_copy(tmp_path, monkeypatch):
    key, env = tmp_path / "key.npz", tmp_path / "env.npz"
    key.write_bytes(b"k")
    env.write_bytes(b"e")
    installed = next(p for p in installed_locations() if p.is_file())  # make env installed it
    monkeypatch.setenv(NIQE_ENV, str(env))
    assert niqe_params_path(str(key)) == str(key)
    assert niqe_params_path(None) == str(env)
    monkeypatch.delenv(NIQE_ENV)
    assert niqe_params_path(None) == str(installed)


def test_setup_installs_verified_parameters_from_the_sdist(tmp_path):
    import io
    import tarfile

    from rag4dmc.pipeline.setup_data import NIQE_SHA256, extract_niqe_params, install_niqe_params

    real = niqe_params_path(None)
    sdist = tmp_path / "basicsr-1.4.2.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(real, arcname="basicsr-1.4.2/basicsr/metrics/niqe_pris_params.npz")
    dest = install_niqe_params(dest=tmp_path / "share" / "niqe_pris_params.npz", sdist=sdist)
    assert dest.read_bytes() == open(real, "rb").read()
    forged = tmp_path / "forged.tar.gz"
    with tarfile.open(forged, "w:gz") as tar:
        info = tarfile.TarInfo("basicsr-1.4.2/basicsr/metrics/niqe_pris_params.npz")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(ValueError, match=NIQE_SHA256):
        extract_niqe_params(forged, tmp_path / "x.npz")


def test_niqe_is_undefined_below_its_patch_size_and_then_leaves_the_ranking_to_cosine(niqe):
    tiny = Image.new("RGB", (NIQE_MIN_SIDE - 1, NIQE_MIN_SIDE + 10), (120, 30, 200))
    scores = niqe([tiny, tiny])
    assert np.isnan(scores).all()
    ranked = image_score(np.array([0.2, 0.7]), scores, SelectionConfig(lambda_quality=1.0))
    assert np.allclose(ranked, [0.2, 0.7])


def _clip_art_images() -> dict[str, Image.Image]:
    """Images on which NIQE's fit breaks down: what real clip art and icons look like."""
    rng = np.random.default_rng(3)
    near = np.clip(200 + rng.integers(-1, 2, (256, 256, 3)), 0, 255).astype(np.uint8)
    line = Image.new("RGB", (256, 256), "white")
    draw = ImageDraw.Draw(line)
    draw.line([(20, 30), (230, 200)], fill="black", width=3)
    draw.ellipse([60, 60, 120, 120], outline="black", width=2)
    flat_art = Image.new("RGB", (300, 300), "white")
    ImageDraw.Draw(flat_art).rectangle([100, 100, 200, 200], fill=(230, 40, 40))
    clear = Image.new("RGBA", (200, 200), (0, 0, 0, 0))
    sticker = Image.new("RGBA", (256, 256), (0, 0, 0, 0))
    ImageDraw.Draw(sticker).ellipse([40, 40, 216, 216], fill=(255, 200, 0, 255), outline=(0, 0, 0, 255), width=4)
    return {"white": Image.new("RGB", (256, 256), "white"), "near_uniform": Image.fromarray(near),
            "line_art": line, "flat_shapes": flat_art, "transparent": clear, "sticker": sticker,
            "tiny": Image.new("RGB", (40, 40), "white"), "grey_L": Image.new("L", (128, 128), 90)}


def test_niqe_is_finite_or_nan_on_flat_line_art_tiny_and_transparent_images(niqe):
    images = _clip_art_images()
    scores = niqe(list(images.values()))
    assert scores.shape == (len(images),)
    assert not np.isinf(scores).any()
    for name in ("white", "near_uniform", "transparent", "tiny", "grey_L"):
        assert np.isnan(scores[list(images).index(name)]), name  # no texture to fit: no quality term
    ranked = image_score(np.linspace(0, 1, len(images)), scores, SelectionConfig(lambda_quality=1.0))
    assert np.isfinite(ranked).all()


def test_a_failure_inside_pyiqa_is_nan_for_that_image_alone(niqe, monkeypatch):
    import torch
    from skimage import data

    photo = Image.fromarray(data.astronaut()).resize((192, 192))
    good = float(niqe([photo])[0])
    calls = {"n": 0}
    real = niqe.metric

    def flaky(x):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge because the input matrix "
                                           "contained non-finite values")
        if calls["n"] == 2:
            return torch.tensor([float("nan")])
        return real(x)

    monkeypatch.setattr(niqe, "metric", flaky)
    before = niqe.undefined
    scores = niqe([photo, photo, photo])
    assert np.isnan(scores[0]) and np.isnan(scores[1])
    assert scores[2] == pytest.approx(good, rel=1e-5)
    assert niqe.undefined == before + 2
