"""What the evaluation reports of the completions' confidence: the KB's own check of its confidence model on
held-out calibration pairs (reliability diagram, ECE, AUROC), and, on a corpus with labels, how label agreement
grows as fewer, more confident completions are kept."""

from __future__ import annotations

import numpy as np

from rag4dmc.pipeline.core.confidence import auroc, by_coverage
from rag4dmc.pipeline.schema import TASK_I2T, TASK_T2I

COVERAGES = (0.25, 0.5, 0.75, 1.0)  # shares of the completions kept, most confident first
DIRECTIONS = (("text", TASK_I2T), ("image", TASK_T2I))  # generated modality, task


def calibration_checks(calibration: dict | None) -> dict:
    """Per direction, the KB's cross-fitted check of its confidence model (None where it has none)."""
    out = {}
    for task, chosen in ((calibration or {}).get("directions") or {}).items():
        conf = chosen.get("confidence")
        out[task] = None if conf is None else {k: conf[k] for k in (
            "pairs", "faithful_share", "faithful_rate", "ece", "auroc", "reliability", "coverage_precision")}
    return out


def label_agreement_by_coverage(completion: dict | None, entry_labels: np.ndarray | None,
                                truth_labels: np.ndarray | None) -> dict:
    """Per direction: the AUROC of confidence for label agreement, and at each coverage of :data:`COVERAGES` the
    label agreement of the most confident completions kept (ties broken by row order)."""
    if completion is None or entry_labels is None or truth_labels is None:
        return {}
    out = {}
    for generated, task in DIRECTIONS:
        c = completion.get(generated)
        if c is None or not len(c["rows"]) or not np.isfinite(c["confidence"]).all():
            continue
        agree = entry_labels[c["entries"]] == truth_labels[c["rows"]]
        out[task] = {"auroc": auroc(c["confidence"], agree), "rows": by_coverage(c["confidence"], agree, COVERAGES)}
    return out
