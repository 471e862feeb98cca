"""The evaluation report as one self-contained HTML page: metrics table, purification, example grid."""

from __future__ import annotations

import base64
import html
import json


def _img(data: bytes | None, size: int = 96) -> str:
    if not data:
        return "<div class='missing'>no image</div>"
    return f"<img width='{size}' height='{size}' src='data:image/png;base64,{base64.b64encode(data).decode()}'>"


def _bar_chart(variants: list, metric: str) -> str:
    """An inline SVG bar chart of one metric across variants."""
    values = [(v.label, v.metrics.get(metric)) for v in variants if v.metrics.get(metric) is not None]
    if not values:
        return ""
    top = max(max(x for _, x in values), 1e-9)
    rows = []
    for i, (label, x) in enumerate(values):
        w = 300 * x / top
        rows.append(f"<text x='0' y='{18 * i + 13}' font-size='11'>{html.escape(label)}</text>"
                    f"<rect x='170' y='{18 * i + 3}' width='{w:.1f}' height='12' fill='#4a7bd0'/>"
                    f"<text x='{175 + w:.1f}' y='{18 * i + 13}' font-size='11'>{x:.3f}</text>")
    return (f"<figure><figcaption>{metric}</figcaption><svg width='540' height='{18 * len(values) + 6}'>"
            + "".join(rows) + "</svg></figure>")


def render_html(payload: dict, variants: list, table_md: str) -> str:
    head = ["variant", *sorted({k for v in variants for k in v.metrics})]
    table = "<table id='metrics'><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
    for v in variants:
        cells = [html.escape(v.label)] + [
            f"{v.metrics[k]:.3f}" if isinstance(v.metrics.get(k), float) else str(v.metrics.get(k, "-"))
            for k in head[1:]]
        table += "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
    table += "</table>"
    settings = "<ul>" + "".join(f"<li><b>{html.escape(v.label)}</b>: {html.escape(json.dumps(v.settings))}</li>"
                                for v in variants) + "</ul>"
    charts = "".join(_bar_chart(variants, m) for m in ("cider", "text_cosine", "image_cosine", "i2t_r1", "t2i_r1"))
    pur = payload.get("purification", {})
    rounds = {m: pur.get("align", {}).get(m, {}).get("rounds", []) for m in ("image", "text")}
    purification = "<pre>" + html.escape(json.dumps({"filter": pur.get("filter"), "align_rounds": rounds},
                                                    indent=1, default=float)) + "</pre>"
    grid = ""
    for v in variants:
        for ex in v.examples[:6]:
            cands = "".join(
                f"<div class='cand{' chosen' if i == ex['chosen'] else ''}'>"
                + (_img(c["image"], 64) if ex["generated"] == "image" else html.escape(c["text"] or ""))
                + f"<br><small>{c['score']:.3f}</small></div>" for i, c in enumerate(ex["candidates"]))
            query = _img(ex["query_image"]) if ex["query_image"] else html.escape(ex["query_text"] or "")
            truth = html.escape(ex["truth_text"]) if ex["generated"] == "text" else _img(ex["truth_image"])
            grid += (f"<tr><td>{html.escape(v.label)}</td><td>{query}</td><td class='cands'>{cands}</td>"
                     f"<td>{truth}</td></tr>")
    return f"""<!doctype html><html><head><meta charset='utf-8'><title>rag4dmc evaluation</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;
padding:4px 6px;font-size:13px}} .cand{{display:inline-block;margin:2px;padding:2px;max-width:160px;vertical-align:top}}
.chosen{{outline:3px solid #2a2}} .missing{{color:#999}}</style></head><body>
<h1>rag4dmc evaluation</h1><p>encoder: {html.escape(str(payload.get('encoder')))}; knowledge bases:
{html.escape(json.dumps(payload.get('kb_rows')))}; {payload.get('seconds', 0):.1f} s</p>
<h2>Metrics</h2>{table}<h3>Variant settings</h3>{settings}<h2>Plots</h2>{charts}
<h2>Purification</h2>{purification}
<h2>Examples</h2><table id='examples'><tr><th>variant</th><th>query</th><th>candidates (chosen outlined)</th>
<th>ground truth</th></tr>{grid}</table></body></html>"""
