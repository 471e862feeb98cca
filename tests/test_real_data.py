"""The default commands on real clip art (Unicode emoji drawn by Noto Color Emoji), not on our own scenes.

Emoji are flat-coloured drawings on transparent backgrounds, the kind of image that broke NIQE inside the
job; their captions are Unicode's names, their labels the emoji groups. The KB, the job and the evaluation
run with default settings: calibration on, NIQE on (its parameters found as a user's install finds them).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from bench.emoji import EMOJI_TEST, parse_emoji_test
from rag4dmc.pipeline.config import EvalConfig, JobConfig
from rag4dmc.pipeline.io.storage import Storage
from rag4dmc.pipeline.job.runner import JobSpec, read_output, run_job
from tests.conftest import EMOJI_TEST_GROUPS


def test_the_emoji_list_is_unicodes_own():
    emoji = parse_emoji_test(EMOJI_TEST.read_text(encoding="utf-8"))
    assert len(emoji) > 3000
    first = emoji[0]
    assert (first.codepoints, first.char, first.name, first.group, first.subgroup) == (
        "1F600", "\U0001F600", "grinning face", "Smileys & Emotion", "face-smiling")
    assert len({e.group for e in emoji}) >= 9


def test_emoji_render_as_transparent_clip_art(emoji_corpus):
    assert emoji_corpus.num_rows > 400
    assert set(emoji_corpus.column("group").to_pylist()) == set(EMOJI_TEST_GROUPS)
    img = Image.open(io.BytesIO(emoji_corpus.column("image")[0].as_py()))
    alpha = np.asarray(img.getchannel("A"))
    assert img.mode == "RGBA" and img.size == (128, 128)
    assert (alpha == 0).mean() > 0.1 and (alpha == 255).mean() > 0.2  # a drawing on a transparent ground


def test_default_kb_build_and_completion_on_clip_art(emoji_split, emoji_kb):
    parts, paths, root = emoji_split
    kb, built = emoji_kb  # `kb build` with the defaults
    cal = built["report"]["calibration"]
    assert cal["niqe"] and cal["holdout_pairs"] >= 30  # image candidates were scored with NIQE
    for task in ("i2t", "t2i"):
        d = cal["directions"][task]
        assert d["fidelity"] >= d["default"]["fidelity"]
    summary = run_job(JobSpec(data=paths["incomplete"], kb=kb, out=str(root / "out"), cfg=JobConfig()))
    n = parts["incomplete"].num_rows
    assert summary["rows_out"] == summary["unique_row_keys"] == n
    assert summary["failed"] == 0 and summary["completed"] == n
    out = read_output(Storage(), str(root / "out")).to_pylist()
    for row in out:
        settings = json.loads(row["settings"])
        assert settings["task"] == ("i2t" if row["generated"] == "text" else "t2i")
        assert settings["user"] == [] and settings["mode"] == "fusion"
        direction = cal["directions"][settings["task"]]
        assert {k: settings[k] for k in ("alpha", "top_k", "n_results")} == direction["retrieval"]
        assert len(row["candidate_ids"]) == len(row["candidate_scores"]) <= settings["n_results"]
        assert row["candidate_ids"][0] in row["retrieved_ids"]
        assert 0 < row["confidence"] < 1  # the KB's calibrated model, on every completed row
    assert summary["abstained"] == 0  # min_confidence 0 by default: every row is completed, as the paper does

    # min_confidence: the rows below it abstain (their completion stays in the provenance), the summary counts
    # them, and --retry-failed leaves them alone (an abstention is an answer, not a failure)
    confidence = {row["row_key"]: row["confidence"] for row in out}
    threshold = float(np.median(list(confidence.values())))
    cfg = JobConfig(min_confidence=threshold)
    strict = run_job(JobSpec(data=paths["incomplete"], kb=kb, out=str(root / "out-strict"), cfg=cfg))
    below = {k for k, v in confidence.items() if v < threshold}
    assert strict["abstained"] == len(below) > 0 and strict["completed"] == n - len(below)
    first = {row["row_key"]: row for row in read_output(Storage(), str(root / "out-strict")).to_pylist()}
    for key, row in first.items():
        assert row["confidence"] == pytest.approx(confidence[key], abs=1e-6)
        if key in below:
            assert row["status"] == "abstained" and row["generated"] is None
            missing = "text" if row["settings"] and json.loads(row["settings"])["task"] == "i2t" else "image"
            assert row[missing] is None and row["candidate_ids"][row["chosen"]] in row["retrieved_ids"]
        else:
            assert row["status"] == "completed"
    again = run_job(JobSpec(data=paths["incomplete"], kb=kb, out=str(root / "out-strict"), cfg=cfg, retry_failed=True))
    assert again["abstained"] == strict["abstained"] and again["failed"] == 0
    assert read_output(Storage(), str(root / "out-strict")).to_pylist() == list(first.values())


@pytest.mark.slow  # the evaluation of three variants, twice, on the real corpus
def test_evaluation_with_labels_and_repeats_on_clip_art(emoji_split, tmp_path):
    from rag4dmc.pipeline.evaluation.runner import evaluate_datasets

    parts, paths, _ = emoji_split
    cfg = EvalConfig.model_validate({
        "encoder": {"device": "cpu"}, "columns": {"label": "label"}, "mapping": {"hidden_dim": 256},
        "evaluation": {"missing_rates": [0.4], "repeats": 2, "variants": ["drop", "vanilla", "rag4dmc",
                                                                          "rag4dmc_confident"], "examples": 2}})
    payload, files = evaluate_datasets(paths["internal"], paths["external"], str(tmp_path / "report"), cfg)
    fused = next(e for e in payload["variants"] if e["name"] == "rag4dmc")
    for metric in ("i2t_label", "t2i_label"):
        assert len(fused["values"][metric]) == 2 and 0 <= fused["metrics"][metric] <= 1
        assert fused["metrics"][metric] > 0.5  # two in-domain groups and an off-domain third: well above chance
        assert metric in fused["paired"]["vanilla"]
    assert "drop" in fused["paired"] and payload["findings"]
    assert "i2t_label" in (tmp_path / "report" / "metrics.md").read_text()

    # RAG4DMC (confident): the observed rows and only the confident completions; its threshold from calibration
    confident = next(e for e in payload["variants"] if e["name"] == "rag4dmc_confident")
    drop = next(e for e in payload["variants"] if e["name"] == "drop")
    for rep in range(2):
        pairs = [e["values"]["train_pairs"][rep] for e in (drop, confident, fused)]
        assert pairs == sorted(pairs)  # no more than RAG4DMC completes, no fewer than the complete pairs
    assert any("RAG4DMC (confident)" in line for line in payload["findings"])
    # the confidence section: the KB's check on held-out pairs, and label agreement by coverage, whose full
    # coverage is the variant's own label agreement in that repeat
    (section,) = payload["confidence"]
    for rep, run in enumerate(section["repeats"]):
        for task, metric in (("i2t", "i2t_label"), ("t2i", "t2i_label")):
            check = run["calibration"][task]
            assert check["pairs"] >= 10 and sum(b["rows"] for b in check["reliability"]) == check["pairs"]
            rows = run["label_agreement"][task]["rows"]
            assert [r["coverage"] for r in rows] == [0.25, 0.5, 0.75, 1.0]
            assert rows[-1]["agreement"] == pytest.approx(fused["values"][metric][rep])
            assert [r["min_confidence"] for r in rows] == sorted((r["min_confidence"] for r in rows), reverse=True)
    assert "Confidence of the completions" in (tmp_path / "report" / "metrics.md").read_text()
