"""Evaluation metrics and the downstream retrieval model."""

import numpy as np
import pytest

from rag4dmc.pipeline.core.metrics import bleu4, cider, coco_tokenize, mean_cosine, recall_at_k
from rag4dmc.pipeline.evaluation.downstream import HeadConfig, evaluate_heads, train_heads
from tests.planted import unit


def test_cider_matches_pycocoevalcap_on_tokenized_captions_and_rewards_the_right_caption():
    refs = ["two red circles on the left", "a blue square in the center", "three green stars at the top"]
    good = ["two red circles on the left side", "a blue square in the centre", "three green stars at top"]
    shuffled = [good[1], good[2], good[0]]
    assert cider(good, refs) > 3 * cider(shuffled, refs)
    assert bleu4(refs, refs) == pytest.approx(1.0)
    assert bleu4(shuffled, refs) < bleu4(good, refs)
    assert coco_tokenize("Two RED circles, left!") == "two red circles left"


def test_recall_at_k_counts_ranks():
    sim = np.array([[0.9, 0.1, 0.0], [0.8, 0.5, 0.0], [0.0, 0.2, 0.1]])
    r = recall_at_k(sim, ks=(1, 2))
    assert r[1] == pytest.approx(1 / 3) and r[2] == pytest.approx(1.0)  # ranks 0, 1, 1
    assert mean_cosine(np.eye(3), np.eye(3)) == pytest.approx(1.0)


def test_heads_learn_a_planted_cross_modal_relation_and_shuffled_pairs_do_not():
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(1200, 16))
    zi = unit(latent @ rng.normal(size=(16, 40)) + 0.3 * rng.normal(size=(1200, 40)))
    zt = unit(latent @ rng.normal(size=(16, 24)) + 0.3 * rng.normal(size=(1200, 24)))
    cfg = HeadConfig(dim=32, epochs=20)
    good = evaluate_heads(train_heads(zi[:1000], zt[:1000], cfg), zi[1000:], zt[1000:])
    perm = rng.permutation(1000)
    bad = evaluate_heads(train_heads(zi[:1000], zt[:1000][perm], cfg), zi[1000:], zt[1000:])
    assert good["i2t_r1"] > 0.5 and good["t2i_r5"] > 0.8
    assert bad["i2t_r5"] < 0.15  # chance is 5/200
