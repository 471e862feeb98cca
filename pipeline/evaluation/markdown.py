"""The evaluation's tables in Markdown (``metrics.md``): the variants' metrics and their paired differences.
"""

from __future__ import annotations

from rag4dmc.pipeline.core.significance import HOLDS, NOISE, REVERSED, UNKNOWN
from rag4dmc.pipeline.evaluation.statistics import signed
from rag4dmc.pipeline.evaluation.variants import (
    METRIC_COLUMNS,
    REFERENCES,
    SETTING_COLUMNS,
    VARIANTS,
    format_estimate,
    format_value,
    table_columns,
)


def markdown_table(entries: list[dict]) -> str:
    """The variants table: one row per (missing rate, variant), its settings, then every metric (mean ± 95% CI)."""
    settings, metrics = table_columns(entries)
    head = ["missing rate", "variant", *settings, *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        cells = [f"{e['missing_rate']:g}", e["label"], *(format_value(SETTING_COLUMNS[c](e["settings"]))
                                                         for c in settings),
                 *(format_estimate(e["metrics"].get(m), e.get("ci", {}).get(m)) for m in metrics)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(entries: list[dict], reference: str) -> str:
    """Each variant minus ``reference`` per metric (mean ± 95% CI over the repeats), marked where it is real."""
    rows = [e for e in entries if reference in e.get("paired", {})]
    metrics = [m for m in METRIC_COLUMNS if m != "train_pairs" and any(m in e["paired"][reference] for e in rows)]
    if not rows or not metrics:
        return ""
    mark = {HOLDS: " (better)", REVERSED: " (worse)", NOISE: "", UNKNOWN: ""}
    lines = ["| missing rate | variant | " + " | ".join(metrics) + " |", "|" + "---|" * (len(metrics) + 2)]
    for e in rows:
        d = e["paired"][reference]
        cells = [f"{signed(d[m]['diff'])} ± {format_value(d[m]['ci'])}{mark[d[m]['verdict']]}" if m in d else "-"
                 for m in metrics]
        lines.append(f"| {e['missing_rate']:g} | {e['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(payload: dict) -> str:
    """metrics.md: the table, the paired differences against the references, and what holds in words."""
    parts = [f"Means ± 95% confidence intervals over {payload.get('repeats', 1)} repeats (independent splits "
             "and masks).", "", markdown_table(payload["variants"])]
    for ref in REFERENCES:
        table = paired_table(payload["variants"], ref)
        if table:
            parts += ["", f"## Paired differences against {VARIANTS[ref]['label']} (same split, same mask)", "", table]
    confidence = confidence_markdown(payload.get("confidence") or [])
    if confidence:
        parts += ["", "## Confidence of the completions", "", confidence]
    if payload.get("findings"):
        parts += ["", "## Which of the paper's orderings hold on this data", "",
                  *[f"- {line}" for line in payload["findings"]]]
    return "\n".join(parts) + "\n"


def confidence_markdown(per_rate: list[dict]) -> str:
    """Per missing rate and direction: the KB's confidence model checked on its held-out calibration pairs (ECE,
    AUROC, the reliability diagram), and the label agreement of the most confident completions by coverage."""
    lines = []
    for entry in per_rate:
        for rep, run in enumerate(entry["repeats"]):
            for task, check in (run.get("calibration") or {}).items():
                head = f"- missing rate {entry['missing_rate']:g}, repeat {rep + 1}, {task}: "
                if check is None:
                    lines.append(head + "no confidence model (too few held-out calibration pairs)")
                    continue
                bins = ", ".join(f"[{b['lo']:.1f}, {b['hi']:.1f}): {b['confidence']:.2f} vs {b['faithful']:.2f} "
                                 f"({b['rows']})" for b in check["reliability"] if b["rows"])
                lines.append(head + f"{check['pairs']} held-out pairs, {format_value(check['faithful_rate'])} "
                             f"faithful; cross-fitted ECE {format_value(check['ece'])}, AUROC "
                             f"{format_value(check['auroc'])}; reliability (confidence vs faithful): {bins}")
                agreement = (run.get("label_agreement") or {}).get(task)
                if agreement:
                    lines.append("  - label agreement of the most confident completions: " + ", ".join(
                        f"{r['coverage']:.0%} kept: {r['agreement']:.3f}" for r in agreement["rows"])
                        + f" (AUROC of confidence for label agreement {format_value(agreement['auroc'])})")
    return "\n".join(lines)
