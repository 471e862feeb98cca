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


@pytest.mark.slow  # the evaluation of three variants, twice, on the real corpus
def test_evaluation_with_labels_and_repeats_on_clip_art(emoji_split, tmp_path):
    from rag4dmc.pipeline.evaluation.runner import evaluate_datasets

    parts, paths, _ = emoji_split
    cfg = EvalConfig.model_validate({
        "encoder": {"device": "cpu"}, "columns": {"label": "label"}, "mapping": {"hidden_dim": 256},
        "evaluation": {"missing_rates": [0.4], "repeats": 2, "variants": ["drop", "vanilla", "rag4dmc"],
                       "examples": 2}})
    payload, files = evaluate_datasets(paths["internal"], paths["external"], str(tmp_path / "report"), cfg)
    fused = next(e for e in payload["variants"] if e["name"] == "rag4dmc")
    for metric in ("i2t_label", "t2i_label"):
        assert len(fused["values"][metric]) == 2 and 0 <= fused["metrics"][metric] <= 1
        assert fused["metrics"][metric] > 0.5  # two in-domain groups and an off-domain third: well above chance
        assert metric in fused["paired"]["vanilla"]
    assert "drop" in fused["paired"] and payload["findings"]
    assert "i2t_label" in (tmp_path / "report" / "metrics.md").read_text()
