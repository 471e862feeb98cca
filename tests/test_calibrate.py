"""Self-calibration at KB build: held-out internal pairs choose the settings, and the job uses them."""

import numpy as np
import pyarrow as pa
import pytest

from rag4dmc.pipeline.config import (
    CalibrationConfig,
    KBConfig,
    MappingConfig,
    RetrievalConfig,
    SelectionConfig,
)
from rag4dmc.pipeline.core.significance import HOLDS, NOISE, REVERSED, mean_ci, paired, verdict
from rag4dmc.pipeline.kb import store as kb_store
from rag4dmc.pipeline.kb.calibrate import cross_fit, holdout_rows
from rag4dmc.pipeline.kb.in_memory import build_knowledge_base
from rag4dmc.pipeline.kb.settings import effective_settings
from tests.planted import unit

D_IMG, D_TXT, N_LABELS = 32, 16, 12
FAST = KBConfig(mapping=MappingConfig(hidden_dim=128, max_epochs=60, lr=3e-3),
                calibration=CalibrationConfig(alpha=[0.0, 0.5, 1.0], top_k=[10, 20], n_results=[1, 4],
                                              lambda_quality=[0.0], lambda_retrieval=[0.0, 2.0]))


def test_held_out_slice_is_bounded_and_needs_enough_pairs():
    cfg = CalibrationConfig(holdout_fraction=0.15, min_holdout=30, max_holdout=400)
    assert len(holdout_rows(1000, cfg)) == 150
    assert len(holdout_rows(10_000_000, cfg)) == 400  # a bounded sample at any corpus size
    assert len(holdout_rows(100, cfg)) == 30
    assert holdout_rows(50, cfg) is None  # 30 held out would leave fewer pairs than held out
    rows = holdout_rows(1000, cfg)
    assert np.all(np.diff(rows) > 0) and rows.max() < 1000
    np.testing.assert_array_equal(rows, holdout_rows(1000, cfg))  # seeded


def test_intervals_and_verdicts():
    mean, ci = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and ci == pytest.approx(4.303 * 1.0 / np.sqrt(3), rel=1e-3)  # t_{0.975, 2} = 4.303
    diff, ci, n = paired([0.5, 0.6, 0.7, np.nan], [0.4, 0.5, 0.6, 0.1])
    assert n == 3 and diff == pytest.approx(0.1) and ci == pytest.approx(0.0, abs=1e-9)
    assert verdict(0.1, 0.05) == HOLDS and verdict(-0.1, 0.05) == REVERSED and verdict(0.02, 0.05) == NOISE
    assert verdict(0.1, 0.05, higher_is_better=False) == REVERSED


def test_cross_fit_is_honest_about_a_lucky_winner():
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(200, 60))  # 200 settings, all equal in truth: the in-sample best is luck
    assert noise.mean(1).max() > 0.25
    assert abs(cross_fit(noise)) < 0.2
    real = noise.copy()
    real[7] += 1.0  # one setting really is better
    assert cross_fit(real) > 0.8


def _style_world(seed: int, n: int):
    """Pairs whose images cluster by a style that says nothing about the text: the intra-modal neighbours of
    an image share its style, not its label; only the mapped (cross) term finds the label."""
    rng = np.random.default_rng(seed)
    label_i, label_t = rng.normal(size=(N_LABELS, D_IMG)) * 0.4, rng.normal(size=(N_LABELS, D_TXT)) * 2
    style = rng.normal(size=(4, D_IMG)) * 4
    lab, sty = rng.integers(0, N_LABELS, n), rng.integers(0, 4, n)
    image = unit(label_i[lab] + style[sty] + 0.8 * rng.normal(size=(n, D_IMG)))
    text = unit(label_t[lab] + 0.3 * rng.normal(size=(n, D_TXT)))
    words = [f"label{k} thing" for k in lab]
    table = pa.table({"id": [f"r{i}" for i in range(n)], "text": words, "image": [b"x"] * n})
    return table, {"image": image, "text": text}, lab


@pytest.fixture(scope="module")
def style_kb():
    table, emb, _ = _style_world(0, 600)
    return build_knowledge_base(table, emb, cfg=FAST)


def test_the_default_stays_unless_a_setting_beats_it_beyond_noise(style_kb):
    cal = style_kb.report["calibration"]
    i2t = cal["directions"]["i2t"]
    grid = {(p["alpha"], p["top_k"], p["n_results"], p["lambda_retrieval"]): p for p in cal["grid"]["i2t"]}
    intra_top1 = grid[(1.0, 10, 1, 0.0)]
    assert i2t["fidelity"] - i2t["ci"] > intra_top1["fidelity"]  # style neighbours give the wrong texts
    assert i2t["fidelity"] >= i2t["default"]["fidelity"]
    assert i2t["fidelity"] >= i2t["top1"]["fidelity"] - i2t["top1"]["ci"]  # never worse than taking the top-1
    default = i2t["default"]  # the configured point exactly, not one that merely shares some of its values
    assert (default["alpha"], default["top_k"], default["n_results"]) == (0.5, 20, 4)
    assert (default["lambda_quality"], default["lambda_retrieval"]) == (0.1, 0.0)
    if i2t["chosen_because"].startswith("the default"):
        assert i2t["retrieval"] == {k: i2t["default"][k] for k in ("alpha", "top_k", "n_results")}
        assert i2t["gain_over_default"] - i2t["gain_over_default_ci"] <= 0
    assert cal["holdout_pairs"] == 90 and cal["train_pairs"] == 510


def test_calibration_leaves_a_default_that_the_held_out_pairs_show_to_be_wrong():
    """With intra-modal top-1 as the configured retrieval, the label lives only in the fused cross term."""
    from rag4dmc.pipeline.kb.calibrate import calibrate

    table, emb, _ = _style_world(0, 600)
    intra_top1 = RetrievalConfig(alpha=1.0, top_k=10, n_results=1)
    cal = calibrate(table.column("text").to_pylist(), None, {m: unit(v) for m, v in emb.items()}, None, None, None,
                    FAST, retrieval=intra_top1)
    i2t = cal["directions"]["i2t"]
    assert i2t["chosen_because"] == "the best grid point"
    assert i2t["retrieval"]["alpha"] < 1.0
    assert i2t["gain_over_default"] - i2t["gain_over_default_ci"] > 0
    assert i2t["cross_fitted_fidelity"] > i2t["default"]["fidelity"]  # out of sample too


def test_calibration_lands_in_the_manifest_and_the_report(style_kb, tmp_path):
    summary = style_kb.manifest["calibration"]
    for task in ("i2t", "t2i"):
        d = summary["directions"][task]
        assert set(d["retrieval"]) == {"alpha", "top_k", "n_results"}
        assert set(d["selection"]) == {"lambda_quality", "lambda_retrieval"}
        assert d["default_fidelity"] is not None and d["cross_fitted_fidelity"] is not None
        assert d["retrieval"] == style_kb.report["calibration"]["directions"][task]["retrieval"]
    assert style_kb.manifest["format"] == kb_store.FORMAT_VERSION  # read back from the KB's folder


def test_a_kb_too_small_to_hold_pairs_out_is_built_uncalibrated():
    table, emb, _ = _style_world(1, 40)
    kb = build_knowledge_base(table, emb, cfg=FAST)
    assert kb.manifest["calibration"] is None and kb.report["calibration"].startswith("skipped")


CALIBRATION = {"directions": {"i2t": {"retrieval": {"alpha": 0.25, "top_k": 40, "n_results": 8},
                                      "selection": {"lambda_quality": 0.0, "lambda_retrieval": 2.0}},
                              "t2i": {"retrieval": {"alpha": 1.0, "top_k": 10, "n_results": 2},
                                      "selection": {"lambda_quality": 0.3, "lambda_retrieval": 0.0}}}}


def test_calibrated_settings_apply_unless_the_user_set_the_key():
    r, s, prov = effective_settings(RetrievalConfig(), SelectionConfig(), CALIBRATION, "i2t")
    assert (r.alpha, r.top_k, r.n_results, s.lambda_quality, s.lambda_retrieval) == (0.25, 40, 8, 0.0, 2.0)
    assert prov["calibrated"] == ["retrieval.alpha", "retrieval.n_results", "retrieval.top_k",
                                  "selection.lambda_quality", "selection.lambda_retrieval"] and prov["user"] == []
    user_r = RetrievalConfig.model_validate({"alpha": 0.5})  # as a flag or YAML key sets it
    user_s = SelectionConfig.model_validate({"lambda_retrieval": 0.0})
    r, s, prov = effective_settings(user_r, user_s, CALIBRATION, "t2i")
    assert (r.alpha, r.top_k, r.n_results, s.lambda_quality, s.lambda_retrieval) == (0.5, 10, 2, 0.3, 0.0)
    assert prov["user"] == ["retrieval.alpha", "selection.lambda_retrieval"]
    assert "retrieval.alpha" not in prov["calibrated"]


def test_calibration_never_produces_an_invalid_retrieval_config():
    r, _, _ = effective_settings(RetrievalConfig.model_validate({"n_results": 16, "top_k": 32}), SelectionConfig(),
                                 CALIBRATION, "t2i")
    assert (r.top_k, r.n_results) == (32, 16)  # both the user's
    r, _, _ = effective_settings(RetrievalConfig.model_validate({"n_results": 16}), SelectionConfig(), CALIBRATION,
                                 "t2i")
    assert r.n_results == 16 and r.top_k >= 16  # the calibrated top_k (10) gives way to the user's n_results


def test_other_retrieval_modes_and_uncalibrated_kbs_keep_the_configured_settings():
    intra = RetrievalConfig.model_validate({"mode": "intra"})
    r, s, prov = effective_settings(intra, SelectionConfig(), CALIBRATION, "i2t")
    assert r == intra and s == SelectionConfig() and prov["calibrated"] == []
    r, s, prov = effective_settings(RetrievalConfig(), SelectionConfig(), None, "i2t")
    assert r == RetrievalConfig() and prov["calibrated"] == [] and prov["alpha"] == 0.5


def test_calibration_works_on_a_bounded_sample_of_a_large_corpus():
    from rag4dmc.pipeline.kb.calibrate import calibrate

    table, emb, _ = _style_world(2, 600)
    ext_table, ext_emb, _ = _style_world(3, 500)
    cfg = FAST.model_copy(update={"calibration": FAST.calibration.model_copy(update={"max_rows": 200})})
    cal = calibrate(table.column("text").to_pylist(), None, {m: unit(v) for m, v in emb.items()},
                    ext_table.column("text").to_pylist(), None, {m: unit(v) for m, v in ext_emb.items()}, cfg)
    assert (cal["holdout_pairs"], cal["train_pairs"], cal["external_rows"]) == (90, 200, 200)
    assert cal["purification"]["tried"] and set(cal["directions"]) == {"i2t", "t2i"}
