"""`rag4dmc evaluate` and its report: the files it writes, its errors, and the page as Chromium renders it.

One small evaluation runs through the CLI (generated scenes: complete pairs as parquet, the external
corpus as JSONL, both read through ``rag4dmc.pipeline.io.datasets``) at two missing rates, every variant, two
sweeps. The split and masking are planted, so the number of training pairs each variant trains on is
known exactly. The report is then opened in headless Chromium: the screenshot must show something and
every example image must have decoded in the browser (``naturalWidth > 0``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rag4dmc.pipeline.cli import main
from rag4dmc.pipeline.config import VARIANT_NAMES
from rag4dmc.pipeline.demo.corpus import write_demo_corpus
from rag4dmc.pipeline.evaluation.markdown import markdown_table
from rag4dmc.pipeline.evaluation.report import render_html
from rag4dmc.pipeline.evaluation.variants import METRICS, VARIANTS

N_COMPLETE, N_EXTERNAL = 100, 120
TEST_FRACTION = 0.2
N_TEST = round(TEST_FRACTION * N_COMPLETE)
N_TRAIN = N_COMPLETE - N_TEST
RATES = (0.5, 0.8)
IMAGE_LOSS_RATIO = 0.25
EXAMPLES = 4  # two image->text, two text->image
REPEATS = 2
SWEEPS = {"alpha": [0.0, 1.0], "k": [4, 8]}
RETRIEVAL_VARIANTS = [v for v in VARIANT_NAMES if VARIANTS[v]["kb"] is not None]
COMPLETION_METRICS = ("bleu4", "cider", "text_cosine", "image_cosine")
RECALL_METRICS = ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")
# Small models (a narrow mapping, one Procrustes round from the identity) keep the evaluation short.
FAST_CONFIG = """\
mapping: {hidden_dim: 128}
align: {max_rounds: 1, init: identity}
encoder: {device: cpu}
evaluation: {test_fraction: 0.2}
"""

CHROMIUM_NAMES = ("chromium", "chromium-browser")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars")
WINDOW = (1400, 2400)
CHROMIUM_TIMEOUT_S = 120
VIRTUAL_TIME_BUDGET_MS = 10_000  # the page's load event and the probe below run within it
# Appended to a copy of the report: records what the browser made of every image once the page has loaded.
PROBE = """<script>
window.addEventListener('load', () => {
  for (const img of document.images) img.dataset.naturalWidth = String(img.naturalWidth);
  document.body.dataset.probe = 'done';
});
</script>"""
MIN_SCREENSHOT_COLOURS = 50
MIN_INK_FRACTION = 0.03  # share of the screenshot that is not page background


@dataclass(frozen=True)
class Evaluation:
    out: Path
    stdout: str
    metrics: dict


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory: pytest.TempPathFactory) -> Evaluation:
    root = tmp_path_factory.mktemp("evaluate")
    complete = write_demo_corpus(str(root / "complete"), N_COMPLETE, 0, 1, seed=3)["internal"]
    external = write_demo_corpus(str(root / "ext"), 1, N_EXTERNAL, 1, seed=3, format="jsonl")["external"]
    (root / "fast.yaml").write_text(FAST_CONFIG)
    argv = ["evaluate", "--data", complete, "--external", external, "--out", str(root / "report"),
            "--config", str(root / "fast.yaml"), "--missing-rate", *map(str, RATES),
            "--variants", *VARIANT_NAMES, "--image-loss-ratio", str(IMAGE_LOSS_RATIO), "--examples", str(EXAMPLES),
            "--mapping-epochs", "5", "--repeats", str(REPEATS)]
    for name, values in SWEEPS.items():
        argv += ["--sweep", f"{name}={','.join(map(str, values))}"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), _one_thread():
        rc = main(argv)
    assert rc == 0, stdout.getvalue()
    metrics = json.loads((root / "report" / "metrics.json").read_text())
    return Evaluation(root / "report", stdout.getvalue(), metrics)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One BLAS and one torch thread: on matrices this small, threads only wait for each other (and for
    whatever else shares the runner's cores)."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(before)


def _entry(metrics: dict, rate: float, name: str) -> dict:
    found = [e for e in metrics["variants"] if e["missing_rate"] == rate and e["name"] == name]
    assert len(found) == 1, f"expected one entry for {name} at missing rate {rate}, got {len(found)}"
    return found[0]


# ------------------------------------------------------------------------------------------------
# metrics.json and metrics.md
# ------------------------------------------------------------------------------------------------


def test_metrics_json_has_one_entry_per_missing_rate_and_variant(evaluation: Evaluation) -> None:
    got = [(e["missing_rate"], e["name"]) for e in evaluation.metrics["variants"]]
    assert got == [(rate, name) for rate in RATES for name in VARIANT_NAMES]
    assert evaluation.metrics["missing_rates"] == list(RATES)
    assert [run["missing_rate"] for run in evaluation.metrics["runs"]] == list(RATES)


def test_each_entry_states_the_settings_that_define_its_variant(evaluation: Evaluation) -> None:
    for rate in RATES:
        for name in VARIANT_NAMES:
            settings = _entry(evaluation.metrics, rate, name)["settings"]
            assert settings["missing_rate"] == rate and settings["image_loss_ratio"] == IMAGE_LOSS_RATIO
            assert settings["kb"] == VARIANTS[name]["kb"]
            if name in RETRIEVAL_VARIANTS:
                assert settings["retrieval"] == VARIANTS[name]["mode"]
                assert settings["n_results"] == 4 and settings["lambda_quality"] == 0.1
                assert ("alpha" in settings) == ("top_k" in settings) == (VARIANTS[name]["mode"] == "fusion")
    fused = _entry(evaluation.metrics, RATES[0], "rag4dmc")["settings"]
    assert (fused["alpha"], fused["top_k"], fused["kb"]) == (0.5, 20, "purified")
    for task in ("i2t", "t2i"):  # what each direction ran with, as the job's settings column says it
        assert fused[task]["task"] == task and fused[task]["mode"] == "fusion"


def test_every_metric_has_its_mean_interval_and_values_per_repeat(evaluation: Evaluation) -> None:
    assert evaluation.metrics["repeats"] == REPEATS
    for entry in evaluation.metrics["variants"]:
        assert entry["repeats"] == REPEATS
        for metric, mean in entry["metrics"].items():
            values = entry["values"][metric]
            assert len(values) == REPEATS
            finite = [v for v in values if v is not None]
            assert mean == pytest.approx(np.mean(finite))
            if len(finite) == REPEATS and len(set(finite)) > 1:
                assert entry["ci"][metric] > 0


def test_variants_are_compared_pairwise_with_drop_and_vanilla(evaluation: Evaluation) -> None:
    for entry in evaluation.metrics["variants"]:
        refs = {"drop", "vanilla"} - {entry["name"]}
        assert set(entry["paired"]) == refs
        for ref in refs:
            other = _entry(evaluation.metrics, entry["missing_rate"], ref)
            for metric, d in entry["paired"][ref].items():
                diffs = [a - b for a, b in zip(entry["values"][metric], other["values"][metric])
                         if a is not None and b is not None]
                assert d["diff"] == pytest.approx(np.mean(diffs)) and d["pairs"] == len(diffs)
                assert d["verdict"] in ("holds", "reversed", "within noise", "unknown")
    orderings = evaluation.metrics["orderings"]
    assert {(o["a"], o["b"]) for o in orderings} >= {("rag4dmc", "drop"), ("rag4dmc", "vanilla"), ("kfa", "combined"),
                                                     ("rag4dmc", "rag4dmc_default")}
    md = (evaluation.out / "metrics.md").read_text()
    for line in evaluation.metrics["findings"]:
        assert line in md and line in evaluation.stdout
    assert "Paired differences against Drop-Incomplete" in md and "Paired differences against Vanilla-RAG" in md


def test_every_variant_has_every_metric_it_can_have(evaluation: Evaluation) -> None:
    for entry in evaluation.metrics["variants"]:
        m = entry["metrics"]
        assert all(0 <= m[k] <= 1 for k in RECALL_METRICS), entry
        completes = entry["name"] in RETRIEVAL_VARIANTS
        for k in COMPLETION_METRICS:
            assert (m.get(k) is not None) == completes, (entry["name"], k)
        if completes:
            assert 0 <= m["bleu4"] <= 1 and m["cider"] >= 0
            assert m["niqe"] > 0  # completed images scored with the installed NIQE parameters
            assert 0 < m["text_cosine"] <= 1 and 0 < m["image_cosine"] <= 1


def test_training_pairs_follow_the_planted_split_and_masking(evaluation: Evaluation) -> None:
    assert evaluation.metrics["rows"] == {"train": N_TRAIN, "test": N_TEST, "external": N_EXTERNAL}
    for rate, run in zip(RATES, evaluation.metrics["runs"]):
        masked = round(rate * N_TRAIN)
        lose_image = round(IMAGE_LOSS_RATIO * masked)
        assert run["masked"] == {"image": lose_image, "text": masked - lose_image, "complete": N_TRAIN - masked}
        assert _entry(evaluation.metrics, rate, "drop")["metrics"]["train_pairs"] == N_TRAIN - masked
        for name in [*RETRIEVAL_VARIANTS, "complete"]:  # every masked row completed, or the truth
            assert _entry(evaluation.metrics, rate, name)["metrics"]["train_pairs"] == N_TRAIN
        assert run["kb_rows"]["internal"] == N_TRAIN - masked
        assert run["kb_rows"]["raw"] == N_TRAIN - masked + N_EXTERNAL
        assert run["kb_rows"]["internal"] < run["kb_rows"]["purified"] < run["kb_rows"]["raw"]


def test_sweeps_evaluate_the_method_at_each_value_at_the_first_rate(evaluation: Evaluation) -> None:
    sweeps = {s["name"]: s for s in evaluation.metrics["sweeps"]}
    assert set(sweeps) == set(SWEEPS)
    for name, values in SWEEPS.items():
        s = sweeps[name]
        assert (s["variant"], s["missing_rate"]) == ("rag4dmc", RATES[0])
        assert [p["value"] for p in s["points"]] == values
        setting = {"alpha": "alpha", "k": "top_k"}[name]
        assert [p["settings"][setting] for p in s["points"]] == values
        assert all(set(RECALL_METRICS) <= set(p["metrics"]) for p in s["points"])


def test_purification_is_reported_per_rate_with_each_alignment_round(evaluation: Evaluation) -> None:
    for run in evaluation.metrics["runs"]:
        pur = run["purification"]
        assert pur["filter"]["kept_pairs"] + pur["filter"]["dropped_pairs"] == N_EXTERNAL
        assert pur["filter"]["kept_pairs"] == run["kb_rows"]["purified"] - run["kb_rows"]["internal"]
        for modality in ("image", "text"):
            rounds = pur["align"][modality]["rounds"]
            assert [r["round"] for r in rounds] == list(range(len(rounds))) and len(rounds) >= 2


def test_markdown_table_lists_every_variant_with_its_settings(evaluation: Evaluation) -> None:
    lines = (evaluation.out / "metrics.md").read_text().strip().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| missing rate | variant | data"))
    table = lines[start:lines.index("", start)]
    head = [c.strip() for c in table[0].strip("|").split("|")]
    assert head[:8] == ["missing rate", "variant", "data / KB", "retrieval", "alpha", "top_k", "n", "lambda"]
    assert set(COMPLETION_METRICS + RECALL_METRICS) <= set(head)
    rows = [dict(zip(head, (c.strip() for c in line.strip("|").split("|")))) for line in table[2:]]
    assert [(float(r["missing rate"]), r["variant"]) for r in rows] == [
        (rate, VARIANTS[name]["label"]) for rate in RATES for name in VARIANT_NAMES]
    fused = next(r for r in rows if r["variant"] == "RAG4DMC")
    assert (fused["data / KB"], fused["retrieval"], fused["alpha"], fused["top_k"], fused["n"]) == (
        "internal + purified external (calibrated)", "fusion", "0.500", "20", "4")
    assert " ± " in fused["bleu4"]  # mean ± half-width of its 95% interval
    assert table == markdown_table(evaluation.metrics["variants"]).splitlines()
    assert "\n".join(table) in evaluation.stdout  # the command prints the same table


# ------------------------------------------------------------------------------------------------
# Errors name the key and the values that would do
# ------------------------------------------------------------------------------------------------


def _evaluate_error(tmp_path: Path, capsys: pytest.CaptureFixture, *flags: str) -> str:
    """stderr of an evaluate command that must be refused before any data is read."""
    rc = main(["evaluate", "--data", str(tmp_path / "absent"), "--external", str(tmp_path / "absent"),
               "--out", str(tmp_path / "report"), *flags])
    assert rc == 2
    assert not (tmp_path / "report").exists()
    return capsys.readouterr().err


def test_an_unknown_variant_is_an_error_naming_the_flag_and_the_choices(tmp_path, capsys) -> None:
    # the flag's choices come from the config's field, so argparse refuses it (exit 2) before any data is read
    with pytest.raises(SystemExit) as exit_:
        _evaluate_error(tmp_path, capsys, "--variants", "rag4dmc", "ragdmc")
    assert exit_.value.code == 2 and not (tmp_path / "report").exists()
    err = capsys.readouterr().err
    assert "--variants" in err and "'ragdmc'" in err
    assert all(f"'{name}'" in err for name in VARIANT_NAMES)


def test_an_unknown_variant_in_a_config_file_is_an_error_naming_the_key_and_the_choices(tmp_path, capsys) -> None:
    (tmp_path / "job.yaml").write_text("evaluation:\n  variants: [rag4dmc, ragdmc]\n")
    err = _evaluate_error(tmp_path, capsys, "--config", str(tmp_path / "job.yaml"))
    assert "evaluation.variants.1" in err
    assert all(f"'{name}'" in err for name in VARIANT_NAMES)


@pytest.mark.parametrize("rate", ["0", "1", "1.5", "-0.2"])
def test_a_missing_rate_outside_the_open_unit_interval_is_an_error_naming_the_key(tmp_path, capsys, rate) -> None:
    err = _evaluate_error(tmp_path, capsys, "--missing-rate", "0.5", rate)
    assert "evaluation.missing_rates" in err and "strictly between 0 and 1" in err


@pytest.mark.parametrize(("spec", "says"), [
    ("alpha", "expected NAME=V1,V2"),
    ("beta=1,2", "evaluation.sweeps.beta"),
    ("alpha=0,2", "evaluation.sweeps.alpha=2"),
    ("k=2", "evaluation.sweeps.k=2 is not a valid retrieval.top_k"),
    ("n=1.5", "takes whole numbers"),
])
def test_a_bad_sweep_is_an_error_naming_the_key(tmp_path, capsys, spec, says) -> None:
    err = _evaluate_error(tmp_path, capsys, "--sweep", spec)
    assert "evaluation.sweeps" in err and says in err


def test_a_missing_dataset_is_an_error_naming_the_path(tmp_path, capsys) -> None:
    rc = main(["evaluate", "--data", str(tmp_path / "absent"), "--external", str(tmp_path / "absent"),
               "--out", str(tmp_path / "report")])
    assert rc == 2 and f"{tmp_path / 'absent'} does not exist" in capsys.readouterr().err


class _ZeroEncoder:
    """Stands in for the encoder where only which rows get embedded matters."""

    name, image_dim, text_dim = "zero", 3, 2

    def encode_images(self, images: list) -> np.ndarray:
        assert all(isinstance(im, Image.Image) for im in images)
        return np.zeros((len(images), self.image_dim), np.float32)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return np.zeros((len(texts), self.text_dim), np.float32)


def test_rows_that_are_not_complete_pairs_are_left_out_with_the_reason(tmp_path: Path) -> None:
    from rag4dmc.pipeline.config import EvalConfig
    from rag4dmc.pipeline.evaluation.data import embed_pairs, read_pairs

    png = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(png, format="PNG")
    (tmp_path / "good.png").write_bytes(png.getvalue())
    (tmp_path / "corrupt.png").write_bytes(b"not an image at all")
    rows = [{"id": "good", "image": "good.png", "text": "a red square"},  # a path relative to the shard
            {"id": "no-text", "image": "good.png", "text": "  "},
            {"id": "no-file", "image": "absent.png", "text": "a red square"},
            {"id": "corrupt", "image": "corrupt.png", "text": "a red square"}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    table, left = read_pairs(str(tmp_path / "pairs.jsonl"), EvalConfig())
    assert table.column("id").to_pylist() == ["good", "corrupt"]  # the URI is fetched; decoding comes later
    assert table.column("image")[0].as_py() == png.getvalue()
    assert [m.split(":")[0] for m in left] == ["no-text", "no-file"]
    assert "no text" in left[0] and "absent.png" in left[1]

    kept, image_emb, text_emb, left = embed_pairs(table, _ZeroEncoder())
    assert kept.column("id").to_pylist() == ["good"] and image_emb.shape == (1, 3) and text_emb.shape == (1, 2)
    assert len(left) == 1 and left[0].startswith("corrupt:") and "could not be decoded" in left[0]


# ------------------------------------------------------------------------------------------------
# The page: a pure function of the payload
# ------------------------------------------------------------------------------------------------


def _planted_payload(rates: list[float], sweeps: list[dict] | None = None) -> dict:
    """Two variants per rate; KFA-RAG has the best CIDEr, the upper bound a better one still."""
    entries = []
    for rate in rates:
        for name, cider in (("kfa", 2.0), ("rag4dmc", 1.0), ("complete", None)):
            metrics = {"i2t_r1": 0.5, "t2i_r1": 0.4, "train_pairs": 10} | ({"cider": cider} if cider else {})
            entries.append({"name": name, "label": VARIANTS[name]["label"], "missing_rate": rate,
                            "settings": {"kb": VARIANTS[name]["kb"]}, "metrics": metrics})
    return {"encoder": "planted", "missing_rates": rates, "variants": entries, "runs": [], "sweeps": sweeps or [],
            "examples": [], "rows": {"train": 8, "test": 2, "external": 0}, "seconds": 1.0}


def test_the_page_is_a_pure_function_of_the_payload() -> None:
    payload = _planted_payload([0.5])
    assert render_html(payload) == render_html(payload)


def test_the_best_value_per_rate_is_marked_and_the_upper_bound_never_is() -> None:
    page = render_html(_planted_payload([0.5, 0.9]))
    best = re.findall(r"<tr[^>]*data-variant='(\w+)' data-missing-rate='([\d.]+)'>(.*?)</tr>", page)
    marked = {(v, r) for v, r, cells in best if "best' data-metric='cider'" in cells}
    assert marked == {("kfa", "0.5"), ("kfa", "0.9")}
    assert not any("best" in cells for v, _, cells in best if v == "complete")


def test_rate_and_sweep_plots_appear_only_when_there_is_more_than_one_point() -> None:
    single = render_html(_planted_payload([0.5]))
    assert "id='by-missing-rate'" not in single and "id='sweeps'" not in single
    sweep = {"name": "alpha", "key": "retrieval.alpha", "variant": "rag4dmc", "label": "RAG4DMC",
             "missing_rate": 0.5, "points": [{"value": v, "metrics": {"cider": v + 1}} for v in (0.0, 0.5, 1.0)]}
    several = render_html(_planted_payload([0.5, 0.9], [sweep]))
    assert "id='by-missing-rate'" in several and "data-sweep='alpha'" in several


# ------------------------------------------------------------------------------------------------
# The page in a real browser
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's headless Chromium; in CI (CI=true) its absence is a failure, elsewhere a skip."""
    found = os.environ.get("RAG4DMC_CHROMIUM") or next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)
    if found:
        return found
    message = (f"no Chromium found (looked for {', '.join(CHROMIUM_NAMES)} on PATH and $RAG4DMC_CHROMIUM): install "
               "Debian's package with `apt-get install chromium` (`make test` does so when it runs as root), "
               "or point RAG4DMC_CHROMIUM at a Chromium binary")
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(message)
    pytest.skip(message)


def _chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                             f"--window-size={WINDOW[0]},{WINDOW[1]}", *args],
                            capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


class _Dom(HTMLParser):
    """Elements of a serialised DOM with the ids of their ancestors (Chromium closes every element)."""

    VOID = frozenset({"img", "meta", "br", "hr", "input", "link", "source", "col", "wbr"})

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, str | None]] = []
        self.elements: list[tuple[str, dict, set[str]]] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attributes = dict(attrs)
        self.elements.append((tag, attributes, {i for _, i in self.stack if i}))
        if tag not in self.VOID:
            self.stack.append((tag, attributes.get("id")))

    def handle_endtag(self, tag: str) -> None:
        while self.stack and self.stack.pop()[0] != tag:
            pass

    def within(self, ancestor: str, tag: str) -> list[dict]:
        return [a for t, a, ids in self.elements if t == tag and ancestor in ids]


@pytest.fixture(scope="module")
def rendered(chromium: str, evaluation: Evaluation, tmp_path_factory: pytest.TempPathFactory) -> tuple[_Dom, Path]:
    """The report's DOM after Chromium loaded it (with the probe), and a screenshot of the page."""
    work = tmp_path_factory.mktemp("chromium")
    page = (evaluation.out / "report.html").read_text()
    probe = evaluation.out / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    dom = _Dom()
    dom.feed(_chromium(chromium, work / "dom-profile", f"--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}",
                       "--dump-dom", probe.as_uri()).stdout)
    shot = evaluation.out / "report.png"
    _chromium(chromium, work / "shot-profile", f"--screenshot={shot}", (evaluation.out / "report.html").as_uri())
    return dom, shot


def test_the_page_needs_nothing_from_the_network(evaluation: Evaluation) -> None:
    page = (evaluation.out / "report.html").read_text()
    assert not re.search(r"""(src|href|url)\s*[=(]\s*['"]?(https?:)?//""", page)
    assert "<script" not in page


def test_chromium_renders_the_metrics_table_with_every_variant_at_every_rate(rendered) -> None:
    dom, _ = rendered
    body = next(a for t, a, _ in dom.elements if t == "body")
    assert body.get("data-probe") == "done", "the probe script did not run: the page did not finish loading"
    rows = [(float(a["data-missing-rate"]), a["data-variant"]) for a in dom.within("metrics", "tr")
            if "data-variant" in a]
    assert rows == [(rate, name) for rate in RATES for name in VARIANT_NAMES]
    metrics_shown = {a["data-metric"] for a in dom.within("metrics", "td") if "data-metric" in a}
    assert set(COMPLETION_METRICS + RECALL_METRICS) <= metrics_shown <= set(METRICS)


def test_chromium_renders_the_plots(rendered) -> None:
    dom, _ = rendered
    figures = [a for t, a, _ in dom.elements if t == "svg"]
    per_metric = len(COMPLETION_METRICS + RECALL_METRICS + ("niqe",))  # NIQE: installed, so on by default
    # by variant, by missing rate, each sweep: one chart per metric; and the alignment criterion
    assert len(figures) == per_metric * (2 + len(SWEEPS)) + 1
    assert {a.get("data-sweep") for t, a, _ in dom.elements if t == "h4"} == set(SWEEPS)
    assert dom.within("alignment", "polyline"), "the alignment criterion is drawn as lines"


def test_chromium_decodes_every_example_image(rendered) -> None:
    dom, _ = rendered
    images = [a for t, a, _ in dom.elements if t == "img"]
    in_examples = dom.within("examples", "img")
    # per image->text example: the query and each retrieval variant's retrieved example; per text->image
    # example: the truth, and per variant the retrieved example, 4 candidates and the chosen one
    n_i2t, n_t2i, n_variants = (EXAMPLES + 1) // 2, EXAMPLES // 2, len(RETRIEVAL_VARIANTS)
    assert len(in_examples) == n_i2t * (1 + n_variants) + n_t2i * (1 + n_variants * (1 + 4 + 1))
    assert len(images) == len(in_examples)
    undecoded = [a.get("alt") for a in images if int(a.get("data-natural-width", "0")) <= 0]
    assert not undecoded, f"images the browser could not decode: {undecoded}"


def test_the_screenshot_shows_the_page(rendered) -> None:
    _, shot = rendered
    picture = Image.open(shot).convert("RGB")
    assert picture.size == WINDOW
    pixels = np.asarray(picture).reshape(-1, 3)
    ink = (np.abs(pixels.astype(int) - pixels[0]).sum(axis=1) > 0).mean()  # the top-left pixel is background
    assert ink > MIN_INK_FRACTION, f"only {ink:.1%} of the screenshot differs from the background"
    colours = np.unique(pixels.astype(np.uint32) @ np.array([1 << 16, 1 << 8, 1], np.uint32))
    assert len(colours) > MIN_SCREENSHOT_COLOURS, f"the screenshot has only {len(colours)} colours"


def test_setting_columns_show_what_each_direction_ran_with() -> None:
    from rag4dmc.pipeline.evaluation.variants import SETTING_COLUMNS

    calibrated = {"retrieval": "fusion", "alpha": 0.5, "n_results": 4,
                  "i2t": {"alpha": 0.75, "n_results": 1}, "t2i": {"alpha": 0.75, "n_results": 8}}
    assert SETTING_COLUMNS["alpha"](calibrated) == 0.75  # both directions alike: one value
    assert SETTING_COLUMNS["n"](calibrated) == "1 / 8"  # i2t / t2i
    assert SETTING_COLUMNS["alpha"]({"retrieval": "intra", "i2t": {"alpha": 0.5}}) is None  # alpha shapes fusion only
    assert SETTING_COLUMNS["n"]({"retrieval": "intra", "n_results": 4}) == 4
