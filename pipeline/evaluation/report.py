"""The evaluation report as one self-contained HTML page, a pure function of the evaluation payload.

Sections: the metrics table (settings and every metric per missing rate and variant), plots (each metric
by variant; by missing rate when there are several; each sweep), the knowledge base's purification
(clusters and rows dropped, the alignment criterion per round) and a grid of example completions
(query, retrieved example, the n candidates with their scores, the chosen one, the ground truth).
Plots are inline SVG and images are data URIs: the page needs no network and no script.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence

from rag4dmc.pipeline.evaluation.variants import (
    METRIC_COLUMNS,
    METRICS,
    REFERENCES,
    SETTING_COLUMNS,
    VARIANTS,
    format_estimate,
    format_value,
    table_columns,
)

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
VARIANT_COLOURS = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(VARIANTS)}
UPPER_BOUND = "complete"  # a reference, not a contender: never marked best
CHART = {"width": 330, "height": 210, "left": 46, "right": 12, "top": 26, "bottom": 34, "ticks": 5}
BAR = {"label_width": 150, "bar_width": 150, "row": 18}
QUERY_PX, CANDIDATE_PX = 96, 72  # displayed sizes of example images
FLAT_PAD = 0.05  # a chart whose values are all equal spans +-5% around them
MIME = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"),
        (b"RIFF", "image/webp"))

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px 32px;color:#222;max-width:1500px}
h1{margin-bottom:4px} h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px} .meta{color:#555}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ccc;padding:3px 7px;font-size:13px;vertical-align:top}
th{background:#f3f5f8;position:sticky;top:0} td.num{text-align:right;font-variant-numeric:tabular-nums}
td.best{font-weight:700;background:#e8f4e8} tr.rate-start td{border-top:2px solid #888}
td.holds{background:#e8f4e8} td.reversed{background:#f8e4e4}
.charts{display:flex;flex-wrap:wrap;gap:10px} figure{margin:0;border:1px solid #e3e3e3;border-radius:4px;padding:4px}
figcaption{font-size:13px;font-weight:600;padding:2px 4px} svg text{font-family:inherit}
.legend{font-size:12px;margin:4px 0 10px} .legend span{display:inline-block;margin-right:14px}
.legend i{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:-1px}
.cand{display:inline-block;margin:2px;padding:3px;max-width:170px;vertical-align:top;font-size:12px;
border:1px solid #ddd;border-radius:3px} .cand.chosen{outline:3px solid #2a2;border-color:#2a2}
.score{color:#555;font-size:11px} .missing{color:#999;font-style:italic} .caption{font-size:12px;max-width:220px}
tr.example-head td{background:#f3f5f8;font-weight:600} .note{color:#666;font-size:13px}
"""


# ------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _mime(data: bytes) -> str:
    return next((m for magic, m in MIME if data.startswith(magic)), "application/octet-stream")


def _img(data: bytes | None, size: int, alt: str) -> str:
    """An <img> with the bytes inline; its box is at most ``size`` pixels on the longer side."""
    if not data:
        return "<div class='missing'>no image</div>"
    src = f"data:{_mime(data)};base64,{base64.b64encode(data).decode()}"
    return (f"<img src='{src}' alt='{_e(alt)}' style='max-width:{size}px;max-height:{size}px;"
            f"display:block'>")


def _num(v: float) -> str:
    """A compact axis or label number."""
    if v == 0:
        return "0"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def _nice_ticks(lo: float, hi: float, n: int) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if hi <= lo:  # one value: a small band around it
        pad = abs(lo) * FLAT_PAD or FLAT_PAD
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t < hi + step * 0.999:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _metric_title(metric: str) -> str:
    return METRICS.get(metric, (metric, None))[0]


# ------------------------------------------------------------------------------------------------
# SVG charts
# ------------------------------------------------------------------------------------------------


def line_chart(title: str, series: Sequence[tuple[str, str, list[tuple[float, float]]]], x_label: str,
               x_ticks: Sequence[float] | None = None, x_names: Sequence[str] | None = None,
               marks: Sequence[tuple[float, str]] = ()) -> str:
    """An SVG line chart: ``series`` are (name, colour, [(x, y)]); ``marks`` are vertical lines (x, label)."""
    points = [(x, y) for _, _, pts in series for x, y in pts if y is not None]
    if not points:
        return ""
    c = CHART
    xs = sorted({x for x, _ in points} | set(x_ticks or ()))
    ys = [y for _, y in points]
    y_ticks = _nice_ticks(min(ys), max(ys), c["ticks"])
    x0, x1 = xs[0], xs[-1]
    y0, y1 = y_ticks[0], y_ticks[-1]
    pw, ph = c["width"] - c["left"] - c["right"], c["height"] - c["top"] - c["bottom"]

    def px(x: float) -> float:
        return c["left"] + (pw / 2 if x1 == x0 else (x - x0) / (x1 - x0) * pw)

    def py(y: float) -> float:
        return c["top"] + ph - (y - y0) / (y1 - y0) * ph

    parts = [f"<rect x='{c['left']}' y='{c['top']}' width='{pw}' height='{ph}' fill='#fbfbfd' stroke='#ccc'/>"]
    for t in y_ticks:
        parts.append(f"<line x1='{c['left']}' x2='{c['left'] + pw}' y1='{py(t):.1f}' y2='{py(t):.1f}' "
                     f"stroke='#e6e6e6'/><text x='{c['left'] - 4}' y='{py(t) + 4:.1f}' font-size='10' "
                     f"text-anchor='end'>{_num(t)}</text>")
    for i, t in enumerate(x_ticks if x_ticks is not None else xs):
        name = x_names[i] if x_names else _num(t)
        parts.append(f"<text x='{px(t):.1f}' y='{c['top'] + ph + 13}' font-size='10' "
                     f"text-anchor='middle'>{_e(name)}</text>")
    for x, label in marks:
        parts.append(f"<line x1='{px(x):.1f}' x2='{px(x):.1f}' y1='{c['top']}' y2='{c['top'] + ph}' "
                     f"stroke='#999' stroke-dasharray='3,3'/><text x='{px(x) + 3:.1f}' y='{c['top'] + 10}' "
                     f"font-size='10' fill='#666'>{_e(label)}</text>")
    for name, colour, pts in series:
        pts = [(x, y) for x, y in pts if y is not None]
        if not pts:
            continue
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        parts.append(f"<polyline points='{path}' fill='none' stroke='{colour}' stroke-width='2'>"
                     f"<title>{_e(name)}</title></polyline>")
        parts += [f"<circle cx='{px(x):.1f}' cy='{py(y):.1f}' r='3' fill='{colour}'><title>{_e(name)}: "
                  f"{_e(_num(x))} -> {y:.4f}</title></circle>" for x, y in pts]
    parts.append(f"<text x='{c['left'] + pw / 2:.1f}' y='{c['height'] - 4}' font-size='11' "
                 f"text-anchor='middle' fill='#444'>{_e(x_label)}</text>")
    return (f"<figure><figcaption title='{_e(_metric_title(title))}'>{_e(title)}</figcaption>"
            f"<svg xmlns='http://www.w3.org/2000/svg' width='{c['width']}' height='{c['height']}' "
            f"role='img' aria-label='{_e(title)}'>{''.join(parts)}</svg></figure>")


def bar_chart(title: str, items: Sequence[tuple[str, str, float]]) -> str:
    """An SVG horizontal bar chart of (label, colour, value); bars start at zero."""
    items = [(label, colour, v) for label, colour, v in items if v is not None]
    if not items:
        return ""
    b = BAR
    top = max(max(abs(v) for _, _, v in items), 1e-12)
    rows = []
    for i, (label, colour, v) in enumerate(items):
        w = b["bar_width"] * abs(v) / top
        y = b["row"] * i
        rows.append(f"<text x='0' y='{y + 13}' font-size='11'>{_e(label)}</text>"
                    f"<rect x='{b['label_width']}' y='{y + 3}' width='{w:.1f}' height='12' fill='{colour}'>"
                    f"<title>{_e(label)}: {v:.4f}</title></rect>"
                    f"<text x='{b['label_width'] + w + 4:.1f}' y='{y + 13}' font-size='11'>{v:.3f}</text>")
    width = b["label_width"] + b["bar_width"] + 50
    return (f"<figure><figcaption title='{_e(_metric_title(title))}'>{_e(title)}</figcaption>"
            f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{b['row'] * len(items) + 6}' "
            f"role='img' aria-label='{_e(title)}'>{''.join(rows)}</svg></figure>")


def _legend(entries: Sequence[tuple[str, str]]) -> str:
    return "<div class='legend'>" + "".join(f"<span><i style='background:{colour}'></i>{_e(name)}</span>"
                                            for name, colour in entries) + "</div>"


# ------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------


def _best_cells(entries: list[dict], metrics: list[str]) -> set[tuple[int, str]]:
    """(entry index, metric) of the best value per missing rate and metric, the upper bound left out."""
    best = set()
    for rate in {e["missing_rate"] for e in entries}:
        for m in metrics:
            better = METRICS.get(m, ("", None))[1]
            cands = [(i, e["metrics"][m]) for i, e in enumerate(entries) if e["missing_rate"] == rate
                     and e["name"] != UPPER_BOUND and e["metrics"].get(m) is not None]
            if better is None or len(cands) < 2:
                continue
            target = (max if better else min)(v for _, v in cands)
            best |= {(i, m) for i, v in cands if v == target}
    return best


def metrics_table(entries: list[dict]) -> str:
    """Every (missing rate, variant) row with its settings and metrics; the best value per rate in bold."""
    settings, metrics = table_columns(entries)
    best = _best_cells(entries, metrics)
    head = ("<tr><th>missing rate</th><th>variant</th>" + "".join(f"<th>{_e(s)}</th>" for s in settings)
            + "".join(f"<th title='{_e(_metric_title(m))}'>{_e(m)}</th>" for m in metrics) + "</tr>")
    rows, last_rate = [], None
    for i, e in enumerate(entries):
        cls = " class='rate-start'" if last_rate is not None and e["missing_rate"] != last_rate else ""
        last_rate = e["missing_rate"]
        cells = [f"<td class='num'>{e['missing_rate']:g}</td>", f"<td>{_e(e['label'])}</td>"]
        cells += [f"<td>{_e(format_value(SETTING_COLUMNS[s](e['settings'])))}</td>" for s in settings]
        cells += [f"<td class='num{' best' if (i, m) in best else ''}' data-metric='{_e(m)}'>"
                  f"{_e(format_estimate(e['metrics'].get(m), e.get('ci', {}).get(m)))}</td>" for m in metrics]
        rows.append(f"<tr{cls} data-variant='{_e(e['name'])}' data-missing-rate='{e['missing_rate']:g}'>"
                    + "".join(cells) + "</tr>")
    note = ("<p class='note'>Means ± 95% confidence intervals over the repeats. Bold: the best mean at each missing "
            "rate (the upper bound left out; NIQE: lower is better). Hover a column for what it measures. Two values "
            "(i2t / t2i): each direction ran with its own calibrated setting. n: retrieved neighbours, which are the "
            "candidates; "
            "lambda: weight of BLEU in selecting a caption.</p>")
    return f"<table id='metrics'>{head}{''.join(rows)}</table>{note}"


def _plotted_metrics(entries: list[dict]) -> list[str]:
    return [m for m in table_columns(entries)[1] if METRICS.get(m, ("", None))[1] is not None]


def variant_charts(entries: list[dict], rate: float) -> str:
    at_rate = [e for e in entries if e["missing_rate"] == rate]
    charts = [bar_chart(m, [(e["label"], VARIANT_COLOURS.get(e["name"], PALETTE[0]), e["metrics"].get(m))
                            for e in at_rate]) for m in _plotted_metrics(at_rate)]
    return f"<h3>Each metric by variant (missing rate {rate:g})</h3><div class='charts'>{''.join(charts)}</div>"


def rate_charts(entries: list[dict], rates: list[float]) -> str:
    if len(rates) < 2:
        return ""
    names = list(dict.fromkeys(e["name"] for e in entries))
    labels = {e["name"]: e["label"] for e in entries}
    colours = {n: VARIANT_COLOURS.get(n, PALETTE[i % len(PALETTE)]) for i, n in enumerate(names)}
    charts = []
    for m in _plotted_metrics(entries):
        series = [(labels[n], colours[n], sorted((e["missing_rate"], e["metrics"].get(m)) for e in entries
                                                 if e["name"] == n)) for n in names]
        charts.append(line_chart(m, series, "missing rate", x_ticks=sorted(rates)))
    return ("<h3 id='by-missing-rate'>Each metric by missing rate</h3>"
            + _legend([(labels[n], colours[n]) for n in names]) + f"<div class='charts'>{''.join(charts)}</div>")


def sweep_charts(sweeps: list[dict]) -> str:
    if not sweeps:
        return ""
    out = ["<h3 id='sweeps'>Sweeps</h3>"]
    for s in sweeps:
        values = [p["value"] for p in s["points"]]
        metrics = [m for m in METRICS if METRICS[m][1] is not None
                   and any(p["metrics"].get(m) is not None for p in s["points"])]
        colour = VARIANT_COLOURS.get(s["variant"], PALETTE[0])
        charts = [line_chart(m, [(s["label"], colour, [(p["value"], p["metrics"].get(m)) for p in s["points"]])],
                             f"{s['name']} ({s['key']})", x_ticks=values) for m in metrics]
        out.append(f"<h4 data-sweep='{_e(s['name'])}'>{_e(s['name'])} = {_e(s['key'])}: {_e(s['label'])} at "
                   f"missing rate {s['missing_rate']:g}, values {_e(', '.join(_num(v) for v in values))}</h4>"
                   f"<div class='charts'>{''.join(charts)}</div>")
    return "".join(out)


FILTER_COLUMNS = (("n_internal_clusters", "internal clusters"), ("n_external_clusters", "external clusters"),
                  ("clusters_kept", "clusters kept"), ("clusters_dropped", "clusters dropped"),
                  ("instances_kept", "rows kept"), ("instances_dropped_by_cluster", "rows dropped (cluster)"),
                  ("instances_dropped_by_instance", "rows dropped (instance)"), ("tau_cent", "tau_cent"),
                  ("tau_inst", "tau_inst"))
MODALITIES = ("image", "text")


def purification_section(runs: list[dict]) -> str:
    """Per missing rate: the cluster filter per modality, pairs kept/dropped, and the alignment criterion."""
    rows, series = [], []
    for j, run in enumerate(runs):
        pur = run.get("purification") or {}
        filt = pur.get("filter") or {}
        for m in MODALITIES:
            rep = filt.get(m)
            if not rep:
                continue
            rows.append(f"<tr><td class='num'>{run['missing_rate']:g}</td><td>{m}</td>"
                        + "".join(f"<td class='num'>{_e(format_value(rep.get(k)))}</td>" for k, _ in FILTER_COLUMNS)
                        + f"<td class='num'>{_e(format_value(filt.get('kept_pairs')))}</td>"
                        f"<td class='num'>{_e(format_value(filt.get('dropped_pairs')))}</td></tr>")
        for m in MODALITIES:
            align = (pur.get("align") or {}).get(m) or {}
            pts = [(r["round"], r["criterion"]) for r in align.get("rounds", [])]
            if pts:
                name = f"{m}, rate {run['missing_rate']:g} (best round {align.get('best_round')})"
                series.append((name, PALETTE[(2 * j + MODALITIES.index(m)) % len(PALETTE)], pts))
    if not rows and not series:
        return "<p class='note'>No external corpus was purified (no external data, or purification disabled).</p>"
    head = ("<tr><th>missing rate</th><th>modality</th>" + "".join(f"<th>{_e(t)}</th>" for _, t in FILTER_COLUMNS)
            + "<th>pairs kept (both)</th><th>pairs dropped (both)</th></tr>")
    table = f"<table id='purification'>{head}{''.join(rows)}</table>" if rows else ""
    kb_rows = "".join(f"<li>missing rate {run['missing_rate']:g}: "
                      + ", ".join(f"{_e(k)} KB {v} entries" for k, v in run.get("kb_rows", {}).items())
                      + "</li>" for run in runs)
    rounds = sorted({x for _, _, pts in series for x, _ in pts})
    chart = line_chart("alignment criterion", series, "Procrustes round (0: initial rotation)", x_ticks=rounds)
    return (f"{table}<ul class='note'>{kb_rows}</ul>"
            "<p class='note'>Alignment criterion: mean cosine of the top CSLS mutual pairs after each round "
            "(MUSE's unsupervised model selection); the best round's rotation is kept.</p>"
            + _legend([(name, colour) for name, colour, _ in series])
            + f"<div class='charts' id='alignment'>{chart}</div>")


def _modality_cell(value: dict, size: int, alt: str) -> str:
    if value.get("image") is not None:
        return _img(value["image"], size, alt)
    if value.get("text") is not None:
        return f"<div class='caption'>{_e(value['text'])}</div>"
    return "<div class='missing'>missing</div>"


def examples_section(examples: list[dict]) -> str:
    """Per example query: one row per variant with its retrieved example, candidates, choice; the truth."""
    if not examples:
        return "<p class='note'>No examples (evaluation.examples is 0, or no variant completed anything).</p>"
    rows = []
    for ex in examples:
        lost = "text" if ex["generated"] == "text" else "image"
        kept = "image" if lost == "text" else "text"
        rows.append(f"<tr class='example-head'><td colspan='6'>{_e(ex['id'])}: {kept} observed, {lost} lost "
                    f"({_e(ex['direction'])})</td></tr>")
        span = max(len(ex["variants"]), 1)
        query = _modality_cell(ex["query"], QUERY_PX, f"query {ex['id']}")
        truth = _modality_cell(ex["truth"], QUERY_PX, f"ground truth {ex['id']}")
        for k, v in enumerate(ex["variants"]):
            cands = "".join(
                f"<div class='cand{' chosen' if i == v['chosen'] else ''}'>"
                + _modality_cell(c, CANDIDATE_PX, f"candidate {c['id']}")
                + f"<div class='score'>{'&#10003; ' if i == v['chosen'] else ''}score {c['score']:.3f}</div></div>"
                for i, c in enumerate(v["candidates"]))
            chosen = v["candidates"][v["chosen"]]
            chosen_cell = _modality_cell(chosen, CANDIDATE_PX, f"chosen {chosen['id']}")
            ret = v["retrieved"]
            retrieved = (_img(ret["image"], CANDIDATE_PX, f"retrieved {ret['id']}")
                         + f"<div class='caption'>{_e(ret['text'])}</div>")
            first = k == 0
            rows.append(f"<tr data-example='{_e(ex['id'])}' data-variant='{_e(v['name'])}'>"
                        + (f"<td rowspan='{span}'>{query}</td>" if first else "")
                        + f"<td>{_e(v['label'])}</td><td>{retrieved}</td><td>{cands}</td>"
                        f"<td>{chosen_cell}</td>"
                        + (f"<td rowspan='{span}'>{truth}</td>" if first else "") + "</tr>")
    head = ("<tr><th>query (observed)</th><th>variant</th><th>retrieved example (top-1)</th>"
            "<th>candidates with selection scores (chosen outlined)</th><th>chosen</th><th>ground truth</th></tr>")
    return f"<table id='examples'>{head}{''.join(rows)}</table>"


def significance_section(payload: dict) -> str:
    """The paper's orderings in words, and each variant's paired difference against the references."""
    findings = "".join(f"<li>{_e(line)}</li>" for line in payload.get("findings", []))
    parts = [f"<p class='note'>Over {payload.get('repeats', 1)} repeats (independent splits and masks); a difference "
             "is real when its paired 95% interval excludes zero.</p>", f"<ul id='findings'>{findings}</ul>"]
    entries = payload.get("variants", [])
    for ref in REFERENCES:
        rows = [e for e in entries if ref in e.get("paired", {})]
        metrics = [m for m in METRIC_COLUMNS if m != "train_pairs" and any(m in e["paired"][ref] for e in rows)]
        if not rows or not metrics:
            continue
        head = "<tr><th>missing rate</th><th>variant</th>" + "".join(f"<th>{_e(m)}</th>" for m in metrics) + "</tr>"
        body = []
        for e in rows:
            d = e["paired"][ref]
            cells = "".join(
                f"<td class='num {d[m]['verdict'].replace(' ', '-')}' data-metric='{_e(m)}'>"
                f"{_e(format_value(d[m]['diff']))} ± {_e(format_value(d[m]['ci']))}</td>" if m in d else "<td>-</td>"
                for m in metrics)
            body.append(f"<tr data-variant='{_e(e['name'])}'><td class='num'>{e['missing_rate']:g}</td>"
                        f"<td>{_e(e['label'])}</td>{cells}</tr>")
        parts.append(f"<h3>Paired difference against {_e(VARIANTS[ref]['label'])}</h3>"
                     f"<table class='paired' data-reference='{_e(ref)}'>{head}{''.join(body)}</table>")
    return "".join(parts)


DIRECTION_COLOURS = {"i2t": "#1f77b4", "t2i": "#d62728"}


def confidence_section(payload: dict) -> str:
    """The confidence of the completions at the first missing rate, first repeat: the KB's reliability diagram on
    held-out calibration pairs (cross-fitted) and, with labels, label agreement by coverage."""
    per_rate = payload.get("confidence") or []
    if not per_rate or not per_rate[0]["repeats"]:
        return "<p class='note'>No confidence figures (no confidence model in this run).</p>"
    run = per_rate[0]["repeats"][0]
    checks = {t: c for t, c in (run.get("calibration") or {}).items() if c}
    if not checks:
        return "<p class='note'>The knowledge base has no confidence model (calibration off, or too few pairs).</p>"
    series = [("perfectly calibrated", "#999", [(0.0, 0.0), (1.0, 1.0)])]
    series += [(f"{t} (ECE {_num(c['ece'])}, AUROC {_num(c['auroc'])})", DIRECTION_COLOURS.get(t, "#333"),
                [(b["confidence"], b["faithful"]) for b in c["reliability"] if b["rows"]]) for t, c in checks.items()]
    parts = [line_chart("reliability: faithful rate against confidence (held-out pairs)", series,
                        "mean confidence of the bin", x_ticks=[0.0, 0.25, 0.5, 0.75, 1.0])]
    agreement = run.get("label_agreement") or {}
    if agreement:
        parts.append(line_chart("label agreement of the most confident completions", [
            (f"{t} (AUROC {_num(a['auroc'])})", DIRECTION_COLOURS.get(t, "#333"),
             [(r["coverage"], r["agreement"]) for r in a["rows"]]) for t, a in agreement.items()],
            "share of completions kept, most confident first"))
    return "".join(parts)


def render_html(payload: dict) -> str:
    """The report page for an evaluation payload (see ``rag4dmc.pipeline.evaluation.runner.evaluate``)."""
    entries = payload.get("variants", [])
    rates = payload.get("missing_rates") or sorted({e["missing_rate"] for e in entries})
    runs = payload.get("runs", [])
    meta = payload.get("meta", {})
    rows = payload.get("rows", {})
    facts = [f"encoder {payload.get('encoder')}",
             f"{rows.get('train', '?')} training / {rows.get('test', '?')} test complete pairs, "
             f"{rows.get('external', '?')} external pairs",
             "missing rates " + ", ".join(f"{r:g}" for r in rates),
             f"{payload.get('seconds', 0):.1f} s"]
    data = "".join(f"<li>{_e(k)}: {_e(v)}</li>" for k, v in meta.items() if not isinstance(v, (dict, list)))
    primary = rates[0] if rates else None
    return f"""<!doctype html>
<html lang='en'><head><meta charset='utf-8'><title>rag4dmc evaluation</title>
<meta name='viewport' content='width=device-width, initial-scale=1'><style>{STYLE}</style></head><body>
<h1>rag4dmc evaluation</h1><p class='meta'>{_e('; '.join(facts))}</p><ul class='meta'>{data}</ul>
<h2>Metrics</h2>{metrics_table(entries)}
<h2>Which differences are real</h2>{significance_section(payload)}
<h2>Plots</h2>{variant_charts(entries, primary) if primary is not None else ''}{rate_charts(entries, list(rates))}
{sweep_charts(payload.get('sweeps', []))}
<h2>Confidence of the completions (missing rate {f'{primary:g}' if primary is not None else '-'})</h2>
{confidence_section(payload)}
<h2>Knowledge-base purification</h2>{purification_section(runs)}
<h2>Examples (missing rate {f'{primary:g}' if primary is not None else '-'})</h2>
{examples_section(payload.get('examples', []))}
</body></html>
"""
