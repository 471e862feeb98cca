"""Confidence of a completion (``rag4dmc.pipeline.core.confidence``): what "faithful" means, the logistic model
fitted on label-free features and its checks, then the KB's model at calibration on a planted world."""

import numpy as np
import pyarrow as pa
import pytest

from rag4dmc.pipeline.config import CalibrationConfig, KBConfig, MappingConfig
from rag4dmc.pipeline.core import confidence as c
from rag4dmc.pipeline.kb.build import confidence_lines
from rag4dmc.pipeline.kb.in_memory import build_knowledge_base
from tests.planted import unit


def test_a_completion_is_faithful_when_closer_to_the_truth_than_the_share_of_the_kb():
    rng = np.random.default_rng(0)
    entries = unit(rng.normal(size=(200, 16)))
    truth = unit(entries[:3] + 0.05 * rng.normal(size=(3, 16)))  # each truth lies next to entry 0, 1, 2
    right = entries[:3]
    wrong = entries[[1, 2, 0]]  # another truth's neighbour: about as close as a random entry
    assert c.faithful(right, truth, entries, 0.95).all()
    assert not c.faithful(wrong, truth, entries, 0.95).any()
    # the share is what the completion must beat: a random entry beats about half the KB, not 95% of it
    half = c.faithful(entries[100:150], unit(rng.normal(size=(50, 16))), entries, 0.5).mean()
    assert 0.3 < half < 0.7


def test_features_read_the_margins_of_the_retrieval_and_of_the_selection():
    x = c.completion_features(fused=[0.9, 0.6, 0.5], cross=[0.2, 0.7, 0.4], scores=[1.0, 1.5, 0.2], chosen=1)
    assert dict(zip(c.FEATURES, x)) == pytest.approx({
        "top_fused": 0.9, "fused_margin": 0.3, "mean_fused": 2.0 / 3, "top_cross": 0.7, "cross_spread": 0.5,
        "chosen_score": 1.5, "score_margin": 0.5})
    single = c.completion_features(fused=[0.4], cross=[0.3], scores=[0.8], chosen=0)
    assert single[1] == 0 and single[6] == 0  # no runner-up: no margin
    with pytest.raises(ValueError, match="no retrieved example"):
        c.completion_features(fused=[], cross=[], scores=[1.0], chosen=0)


def _planted(n: int, seed: int):
    """Rows whose chance of being faithful is sigmoid(3 * x0 - 1): the other features are noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(c.FEATURES)))
    p = 1 / (1 + np.exp(-(3 * x[:, 0] - 1)))
    return x, rng.random(n) < p, p


def test_the_cross_fitted_model_is_calibrated_and_ranks_faithful_rows_first():
    x, y, p_true = _planted(3000, 1)
    p = c.cross_fitted(x, y, folds=5, seed=0)
    assert c.ece(p, y) < 0.04
    assert c.auroc(p, y) == pytest.approx(c.auroc(p_true, y), abs=0.01)  # as good as the true probability
    model = c.fit(x, y)
    assert model.coef[0] > 2 * max(abs(v) for v in model.coef[1:])  # the signal, not the noise
    back = c.ConfidenceModel.from_dict(model.to_dict())
    np.testing.assert_allclose(c.predict(back, x[:5]), c.predict(model, x[:5]))


def test_a_model_of_another_feature_set_is_refused_and_one_class_gives_its_rate():
    x, y, _ = _planted(50, 2)
    d = c.fit(x, y).to_dict() | {"features": ["top_fused"]}
    with pytest.raises(ValueError, match="rebuild the KB"):
        c.ConfidenceModel.from_dict(d)
    always = c.fit(x, np.ones(50, bool))
    assert np.all(c.predict(always, x) > 0.95) and np.ptp(c.predict(always, x)) == 0


def test_reliability_ece_auroc_and_coverage_on_worked_examples():
    p = np.array([0.2] * 10 + [0.9] * 10)
    y = np.array([1, 1] + [0] * 8 + [1] * 5 + [0] * 5, bool)
    bins = {b["lo"]: b for b in c.reliability(p, y) if b["rows"]}
    assert bins[0.2]["faithful"] == pytest.approx(0.2) and bins[0.9]["faithful"] == pytest.approx(0.5)
    assert c.ece(p, y) == pytest.approx(0.5 * 0 + 0.5 * 0.4)
    assert c.auroc(np.arange(4), np.array([0, 0, 1, 1], bool)) == 1.0
    assert c.auroc(-np.arange(4), np.array([0, 0, 1, 1], bool)) == 0.0
    assert c.auroc(np.ones(4), np.array([0, 0, 1, 1], bool)) == 0.5
    table = c.coverage_precision(p, y, [0.5, 0.95])
    assert table[0] == {"threshold": 0.5, "coverage": 0.5, "precision": 0.5}
    assert table[1]["coverage"] == 0 and table[1]["precision"] is None
    two = c.coverage_precision(p, y, [0.1, 0.5])
    assert c.threshold_for(two, 0.45) == 0.5 and c.threshold_for(two, 0.6) is None
    rows = c.by_coverage(p, y, [0.5, 1.0])  # the most confident half is the 0.9 rows, half of them faithful
    assert [(r["rows"], r["agreement"], r["min_confidence"]) for r in rows] == [(10, 0.5, 0.9), (20, 0.35, 0.2)]


# ----------------------------------------------------------------------------- the KB's model, at calibration

D_IMG, D_TXT, N_LABELS = 32, 16, 12
SHARP, BLURRED = 0.3, 5.0  # the noise on an image against its label's centre (of norm ~ sqrt(D_IMG))
CAL_KB = KBConfig(mapping=MappingConfig(hidden_dim=128, max_epochs=60, lr=3e-3),
                  calibration=CalibrationConfig(alpha=[0.5], top_k=[20], n_results=[4], lambda_quality=[0.0],
                                                lambda_retrieval=[0.0], max_holdout=300, holdout_fraction=0.3))


def _blurred_world(seed: int, n: int):
    """Pairs of 12 labels, half of whose images are blurred by strong noise: a sharp image retrieves its own
    label's texts, a blurred one anything. Whether a completion is right is planted in whether its query is
    blurred, which no feature reads directly."""
    rng = np.random.default_rng(seed)
    label_i, label_t = rng.normal(size=(N_LABELS, D_IMG)), rng.normal(size=(N_LABELS, D_TXT))
    lab = rng.integers(0, N_LABELS, n)
    blur = np.where(rng.random(n) < 0.5, SHARP, BLURRED)[:, None]
    image = unit(label_i[lab] + blur * rng.normal(size=(n, D_IMG)))
    text = unit(label_t[lab] + 0.3 * rng.normal(size=(n, D_TXT)))
    table = pa.table({"id": [f"r{i}" for i in range(n)], "text": [f"label{k} thing" for k in lab],
                      "image": [b"x"] * n})
    return table, {"image": image, "text": text}


QUERIES = 60  # rows of the blurred world left out of the KB: the completion stage's input


@pytest.fixture(scope="module")
def blurred_kb():
    table, emb = _blurred_world(0, 1000 + QUERIES)
    return build_knowledge_base(table.slice(0, 1000), {m: v[:1000] for m, v in emb.items()}, cfg=CAL_KB)


def test_calibration_fits_a_confidence_model_that_ranks_and_is_calibrated_on_pairs_it_did_not_see(blurred_kb):
    kb = blurred_kb
    i2t = kb.manifest["calibration"]["directions"]["i2t"]["confidence"]
    assert i2t["pairs"] == 300 and 0.2 < i2t["faithful_rate"] < 0.9  # both kinds of completion occur
    assert i2t["auroc"] > 0.75  # sharp queries are told from blurred ones by their scores alone
    assert i2t["ece"] < 0.1
    coverage = {r["threshold"]: r for r in i2t["coverage_precision"]}
    assert coverage[0.8]["precision"] > i2t["faithful_rate"] + 0.15  # keeping the confident is worth something
    assert coverage[0.1]["coverage"] > coverage[0.9]["coverage"]
    assert set(c.FEATURES) == set(i2t["model"]["features"])
    lines = confidence_lines(kb.manifest["calibration"])  # what `kb build` prints before the spend
    assert any(line.startswith("confidence i2t: 300 held-out pairs") for line in lines)
    assert any("at 0.8:" in line and "kept" in line for line in lines)


def _captions(kb, min_confidence: float, model: dict | None, n: int = QUERIES) -> dict:
    """Image -> text completions of ``n`` blurred images the KB does not hold, by the job's stage with the KB's
    settings."""
    from rag4dmc.actors.complete import CompleteTexts, completion_batch
    from rag4dmc.actors.stage import apply
    from rag4dmc.pipeline.config import EncoderConfig, GeneratorConfig, RetrievalConfig, SelectionConfig
    from rag4dmc.pipeline.kb.settings import effective_settings

    _, world = _blurred_world(0, 1000 + QUERIES)
    emb = {m: v[1000:1000 + n] for m, v in world.items()}
    retrieval, selection, _ = effective_settings(RetrievalConfig(), SelectionConfig(), kb.manifest["calibration"],
                                                 "i2t")
    neigh = kb.retrieve(emb["image"], "image", retrieval)
    stage = CompleteTexts(GeneratorConfig(text_backend="nn"), selection, EncoderConfig(), kb.entries,
                          confidence=model, min_confidence=min_confidence)
    stage.ensure_setup()
    return apply(stage, completion_batch("i2t", [f"q{i}" for i in range(n)], [None] * n, [None] * n, neigh.ids,
                                         neigh.fused, neigh.cross, kb.pseudo(emb["image"], "image")))


def test_a_completed_row_below_min_confidence_abstains_and_keeps_its_candidates(blurred_kb):
    model = blurred_kb.manifest["calibration"]["directions"]["i2t"]["confidence"]["model"]
    every = _captions(blurred_kb, 0.0, model)
    assert set(every["status"]) == {"completed"}
    conf = np.asarray(every["confidence"], float)
    assert ((conf >= 0) & (conf <= 1)).all() and np.ptp(conf) > 0.3  # sure of some rows, unsure of others
    some = _captions(blurred_kb, 0.7, model)
    np.testing.assert_allclose(some["confidence"], conf)  # the threshold changes the status, not the confidence
    low = conf < 0.7
    assert low.any() and (~low).any()
    assert list(some["status"]) == ["abstained" if v else "completed" for v in low]
    for j in np.flatnonzero(low):  # no completion in the text column; the best candidate stays in the provenance
        assert some["text"][j] is None and some["candidates"][j][some["chosen"][j]] == every["text"][j]
    for j in np.flatnonzero(~low):
        assert some["text"][j] == every["text"][j]
    assert np.isnan(np.asarray(_captions(blurred_kb, 0.0, None, n=5)["confidence"], float)).all()  # no model


def test_min_confidence_without_a_confidence_model_is_refused_saying_what_to_do(blurred_kb):
    with pytest.raises(ValueError, match="no confidence model .* rebuild it with calibration"):
        _captions(blurred_kb, 0.5, None)
