"""The evaluation's statistics over repeats: each metric's mean and 95% interval, paired differences against the
reference variants (same split, same mask), and the paper's orderings said to hold, be reversed or lie within noise
(the tests: ``rag4dmc.pipeline.core.significance``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from rag4dmc.pipeline.core.significance import HOLDS, NOISE, REVERSED, UNKNOWN, mean_ci, paired, verdict
from rag4dmc.pipeline.evaluation.variants import (
    METRIC_COLUMNS,
    METRICS,
    ORDERINGS,
    REFERENCES,
    format_value,
)


@dataclass
class VariantResult:
    name: str
    label: str
    settings: dict
    metrics: dict = field(default_factory=dict)
    completion: dict | None = None  # what complete_variant returned (for the examples)
    kb: str | None = None
    seconds: float = 0.0


def aggregate(runs: list[list[dict]], names: list[str]) -> list[dict]:
    """One table entry per (missing rate, variant) from ``runs[repeat][rate]``: per metric the mean, its 95%
    interval and the per-repeat values, and the paired difference against each of ``REFERENCES``."""
    entries = []
    for k, first in enumerate(runs[0]):
        per_repeat = {r.name: [rep[k]["by_name"][r.name] for rep in runs] for r in first["variants"]}
        for r in first["variants"]:
            results = per_repeat[r.name]
            values = {m: [res.metrics.get(m) for res in results] for m in METRIC_COLUMNS}
            values = {m: [np.nan if v is None else float(v) for v in vs] for m, vs in values.items()
                      if any(v is not None for v in vs)}
            stats = {m: mean_ci(vs) for m, vs in values.items()}
            entry = {"name": r.name, "label": r.label, "missing_rate": first["missing_rate"], "settings": r.settings,
                     "metrics": finite({m: st[0] for m, st in stats.items()}),
                     "ci": finite({m: st[1] for m, st in stats.items()}),
                     "values": finite(values), "repeats": len(results),
                     "seconds": round(float(np.mean([res.seconds for res in results])), 3), "paired": {}}
            for ref in REFERENCES:
                if ref in per_repeat and ref != r.name:
                    entry["paired"][ref] = finite(paired_differences(values, per_repeat[ref]))
            entries.append(entry)
    return entries


def paired_differences(values: dict[str, list[float]], reference: list[VariantResult]) -> dict[str, dict]:
    """Per metric: mean and 95% interval of (this variant - reference) over the repeats, and the verdict."""
    out = {}
    for m, vs in values.items():
        ref = [np.nan if res.metrics.get(m) is None else float(res.metrics[m]) for res in reference]
        if all(np.isnan(ref)):
            continue
        diff, ci, n = paired(vs, ref)
        out[m] = {"diff": diff, "ci": ci, "pairs": n, "verdict": verdict(diff, ci, METRICS[m][1] is not False)}
    return out


def orderings(entries: list[dict]) -> list[dict]:
    """The paper's orderings (``ORDERINGS``) checked on this data: per rate and metric, a - b with its 95%
    interval and whether "a beats b" holds, is reversed, or is within noise."""
    at = {(e["missing_rate"], e["name"]): e for e in entries}
    out = []
    for rate in sorted({e["missing_rate"] for e in entries}):
        for a, b, metrics, claim in ORDERINGS:
            ea, eb = at.get((rate, a)), at.get((rate, b))
            if ea is None or eb is None:
                continue
            for m in metrics:
                va, vb = ea["values"].get(m), eb["values"].get(m)
                if va is None or vb is None:
                    continue
                diff, ci, n = paired([np.nan if v is None else v for v in va], [np.nan if v is None else v for v in vb])
                out.append(finite({"missing_rate": rate, "a": a, "b": b, "metric": m, "claim": claim, "diff": diff,
                                    "ci": ci, "pairs": n, "verdict": verdict(diff, ci, METRICS[m][1] is not False)}))
    return out


def orderings_text(found: list[dict], labels: dict[str, str]) -> list[str]:
    """One sentence per (rate, claim): on which metrics it holds, is reversed, or is within noise."""
    lines = []
    for (rate, a, b, claim), group in itertools.groupby(found, key=lambda o: (o["missing_rate"], o["a"], o["b"],
                                                                              o["claim"])):
        group = list(group)
        parts = []
        for word in (HOLDS, REVERSED, NOISE, UNKNOWN):
            ms = [f"{o['metric']} ({signed(o['diff'])} ± {format_value(o['ci'])})" for o in group
                  if o["verdict"] == word]
            if ms:
                parts.append(f"{word} on {', '.join(ms)}")
        lines.append(f"At missing rate {rate:g}, {labels[a]} vs {labels[b]} ({claim}): {'; '.join(parts)}.")
    return lines


def signed(v) -> str:
    return "-" if v is None else f"{v:+.3f}"


def finite(value):
    """``value`` with NaN and infinities as None (JSON has neither), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value
