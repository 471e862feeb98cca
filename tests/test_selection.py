"""Candidate selection: s_T = l1*cos + l2*BLEU, s_I = l1*cos - l2*NIQE, NIQE parameters read offline."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from pipeline.selection import NiqeParamsMissing, NiqeScorer, image_scores, sentence_bleu, text_scores

NIQE_PARAMS = Path(__file__).resolve().parents[2] / "shared" / "niqe" / "niqe_pris_params.npz"


def test_sentence_bleu_is_scaled_to_unit_range():
    assert sentence_bleu("a red circle on the left", "a red circle on the left") == pytest.approx(1.0)
    assert sentence_bleu("purple elephants dancing", "a red circle on the left") < 0.05
    assert sentence_bleu("", "anything") == 0.0


def test_text_score_is_the_weighted_sum_of_cosine_and_bleu():
    cands = ["a red circle on the left", "two blue squares", "a red circle"]
    emb = np.array([[1, 0], [0, 1], [0.6, 0.8]], np.float32)
    pseudo = np.array([0, 1], np.float32)
    s = text_scores(emb, pseudo, cands, "a red circle on the left", lambda_cos=1.0, lambda_quality=0.5)
    bleu = np.array([sentence_bleu(c, "a red circle on the left") for c in cands])
    np.testing.assert_allclose(s, np.array([0.0, 1.0, 0.8]) + 0.5 * bleu, atol=1e-5)
    only_cos = text_scores(emb, pseudo, cands, "a red circle on the left", 1.0, 0.0)
    assert int(np.argmax(only_cos)) == 1


def test_image_score_penalises_niqe():
    emb = np.array([[1, 0], [1, 0]], np.float32)
    s = image_scores(emb, np.array([1, 0]), niqe=np.array([3.0, 30.0]), lambda_cos=1, lambda_quality=1, niqe_scale=0.1)
    np.testing.assert_allclose(s, [1 - 0.3, 1 - 3.0], atol=1e-6)


@pytest.fixture(scope="module")
def niqe():
    return NiqeScorer(str(NIQE_PARAMS))


def test_niqe_ranks_a_natural_photo_above_noise_and_blur(niqe):
    from skimage import data

    photo = Image.fromarray(data.astronaut()).resize((256, 256))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    blurred = photo.filter(ImageFilter.GaussianBlur(6))
    scores = niqe([photo, noise, blurred])
    assert scores[0] < scores[1] and scores[0] < scores[2]


def test_niqe_reads_npz_and_mat_alike(niqe, tmp_path):
    import scipy.io

    p = np.load(NIQE_PARAMS)
    mat = tmp_path / "niqe.mat"
    scipy.io.savemat(mat, {"mu_prisparam": p["mu_pris_param"], "cov_prisparam": p["cov_pris_param"]})
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (96, 96, 3), dtype=np.uint8))
    np.testing.assert_allclose(NiqeScorer(str(mat))([img]), niqe([img]), rtol=1e-5)


def test_missing_niqe_parameters_say_what_to_do(tmp_path):
    with pytest.raises(NiqeParamsMissing, match="selection.niqe_params"):
        NiqeScorer(str(tmp_path / "nope.npz"))
    with pytest.raises(NiqeParamsMissing, match="image_quality to none"):
        NiqeScorer(None)


def test_niqe_is_undefined_below_its_patch_size_and_then_leaves_the_ranking_to_cosine(niqe):
    from PIL import Image

    from pipeline.selection import NIQE_MIN_SIDE, image_score

    tiny = Image.new("RGB", (NIQE_MIN_SIDE - 1, NIQE_MIN_SIDE + 10), (120, 30, 200))
    scores = niqe([tiny, tiny])
    assert np.isnan(scores).all()
    ranked = image_score(np.array([0.2, 0.7]), scores, lambda_cos=1.0, lambda_quality=1.0, niqe_scale=0.1)
    assert np.allclose(ranked, [0.2, 0.7])
