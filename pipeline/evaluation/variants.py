"""The evaluation's variant registry, metrics, the paper's orderings and the table columns (a leaf module:
the evaluation runner, the report and the CLI import it, it imports none of them)."""

from __future__ import annotations

from rag4dmc.pipeline.config import VARIANT_NAMES
from rag4dmc.pipeline.schema import TASK_I2T, TASK_T2I

# kb: which knowledge base the variant retrieves from (None: it completes nothing); mode: retrieval.mode.
VARIANTS: dict[str, dict] = {
    "drop": {"label": "Drop-Incomplete", "kb": None, "training_data": "complete pairs only"},
    "direct": {"label": "Direct (mapped NN)", "kb": "internal", "mode": "mapped"},
    "vanilla": {"label": "Vanilla-RAG", "kb": "internal", "mode": "intra"},
    "combined": {"label": "Combined-RAG", "kb": "raw", "mode": "intra"},
    "kfa": {"label": "KFA-RAG", "kb": "purified", "mode": "intra"},
    "rag4dmc": {"label": "RAG4DMC", "kb": "purified", "mode": "fusion", "calibrated": True},
    "rag4dmc_default": {"label": "RAG4DMC (paper defaults)", "kb": "purified_default", "mode": "fusion"},
    # RAG4DMC that abstains below a confidence threshold chosen on the KB's calibration pairs alone
    "rag4dmc_confident": {"label": "RAG4DMC (confident)", "kb": "purified", "mode": "fusion", "calibrated": True,
                          "confident": True},
    "complete": {"label": "Complete (upper bound)", "kb": None, "training_data": "the true training data"},
}
assert tuple(VARIANTS) == VARIANT_NAMES, "evaluate.VARIANTS and config.VariantName must list the same variants"
KB_DESCRIPTIONS = {"internal": "internal", "raw": "internal + raw external",
                   "purified": "internal + purified external (calibrated)",
                   "purified_default": "internal + purified external (default thresholds)"}
# The paper's claims, each checked per missing rate as a paired difference: (a, b, metrics where a > b).
QUALITY = ("bleu4", "text_cosine", "image_cosine")
DOWNSTREAM = ("i2t_r1", "t2i_r1")
LABELS = ("i2t_label", "t2i_label")
ORDERINGS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("rag4dmc", "drop", DOWNSTREAM, "completing the missing modality beats dropping incomplete rows"),
    ("rag4dmc", "vanilla", QUALITY + DOWNSTREAM + LABELS, "the purified dual KB with fusion beats internal-only RAG"),
    ("rag4dmc", "kfa", QUALITY + DOWNSTREAM + LABELS, "fusion retrieval beats intra-modal retrieval"),
    ("kfa", "combined", QUALITY + DOWNSTREAM + LABELS, "purifying the external corpus beats using it raw"),
    ("rag4dmc", "rag4dmc_default", QUALITY + DOWNSTREAM + LABELS, "calibrated settings beat the paper's defaults"),
    ("rag4dmc_confident", "drop", DOWNSTREAM, "completing only the confident rows beats dropping incomplete rows"),
    ("rag4dmc_confident", "rag4dmc", LABELS, "the confident completions are right more often than all completions"),
)
REFERENCES = ("drop", "vanilla")  # every variant's paired difference against these is reported

# Every metric: what it measures and whether higher is better (None: a count, not a quality).
METRICS: dict[str, tuple[str, bool | None]] = {
    "bleu4": ("BLEU-4 of completed texts against the true texts", True),
    "cider": ("CIDEr-D of completed texts against the true texts", True),
    "text_cosine": ("cosine of completed and true text embeddings", True),
    "image_cosine": ("cosine of completed and true image embeddings", True),
    "niqe": ("NIQE of completed images (lower is more natural)", False),
    "i2t_r1": ("downstream image->text recall@1 on the test split", True),
    "i2t_r5": ("downstream image->text recall@5 on the test split", True),
    "t2i_r1": ("downstream text->image recall@1 on the test split", True),
    "t2i_r5": ("downstream text->image recall@5 on the test split", True),
    "i2t_label": ("completed texts whose source entry has the query's label (label column)", True),
    "t2i_label": ("completed images whose source entry has the query's label (label column)", True),
    "train_pairs": ("image-text pairs the downstream model trained on", None),
}
METRIC_COLUMNS = tuple(METRICS)


def _ran_with(key: str, fusion_only: bool = False):
    """A setting column: the value each direction ran with ("i2t / t2i" where calibration made them differ),
    or the configured one."""
    def cell(s: dict):
        ran = [s[t][key] for t in (TASK_I2T, TASK_T2I) if isinstance(s.get(t), dict) and key in s[t]]
        if fusion_only and s.get("retrieval") != "fusion":
            return None
        if not ran:
            return s.get(key)
        return ran[0] if len(set(ran)) == 1 else " / ".join(format_value(v) for v in ran)
    return cell


SETTING_COLUMNS = {  # column -> how a variant's settings fill it
    "data / KB": lambda s: s.get("kb_content") or s.get("training_data", "-"),
    "retrieval": lambda s: s.get("retrieval", "-"),
    "alpha": _ran_with("alpha", fusion_only=True),
    "top_k": _ran_with("top_k", fusion_only=True),
    "n": _ran_with("n_results"),
    "lambda": _ran_with("lambda_quality"),
}


def format_value(v) -> str:
    """A table cell: floats to 3 decimals, missing values as '-'."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def table_columns(entries: list[dict]) -> tuple[list[str], list[str]]:
    """(setting columns, metric columns) for ``entries``: metrics no variant has are left out."""
    metrics = [m for m in METRIC_COLUMNS if any(e["metrics"].get(m) is not None for e in entries)]
    return list(SETTING_COLUMNS), metrics


def format_estimate(mean, ci) -> str:
    """A cell "mean ± half-width" (just the mean with one repeat)."""
    return format_value(mean) if ci is None else f"{format_value(mean)} ± {format_value(ci)}"
