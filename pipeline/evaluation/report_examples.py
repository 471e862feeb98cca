"""Examples for the evaluation report: a few masked rows with each variant's retrieved entry, candidates and choice."""

from __future__ import annotations

import io

import numpy as np

from rag4dmc.pipeline.evaluation.data import EvalData


def thumbnail(data: bytes, size: int) -> bytes:
    """``data`` as a PNG whose longer side is at most ``size`` pixels (the report embeds these)."""
    from rag4dmc.actors.images import load_image

    picture = load_image(data)
    picture.thumbnail((size, size))
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()


def examples(data: EvalData, run: dict, n: int, thumb_px: int) -> list[dict]:
    """The same ``n`` masked rows (half lost their text, half their image) as every variant completed them.

    Each example: ``direction`` (i2t or t2i), the ``query`` (the observed modality), the ``truth``
    (the lost one) and per variant the top ``retrieved`` entry, the ``candidates`` with their scores
    and the index of the ``chosen`` one. Images are thumbnails.
    """
    thumbs: dict[bytes, bytes] = {}

    def thumb(b: bytes | None) -> bytes | None:
        if b is not None and b not in thumbs:
            thumbs[b] = thumbnail(b, thumb_px)
        return None if b is None else thumbs[b]

    kbs = {name: v.kb for name, v in run["kbs"].items()}

    def entry(kb: str, i: int, fields: tuple[str, ...]) -> dict:
        entries = kbs[kb].entries
        out = {"id": entries.column("id")[i].as_py()}
        if "text" in fields:
            out["text"] = entries.column("text")[i].as_py()
        if "image" in fields:
            out["image"] = thumb(kbs[kb].images([i])[0])
        return out

    done = [r for r in run["variants"] if r.completion]
    train_ids, train_texts, train_images = (data.train.column(c).to_pylist() for c in ("id", "text", "image"))
    out = []
    for generated, direction, count in (("text", "i2t", (n + 1) // 2), ("image", "t2i", n // 2)):
        observed = "image" if generated == "text" else "text"
        rows = np.flatnonzero(data.lose_text if generated == "text" else data.lose_image)[:count]
        for row in rows:
            truth = {"text": train_texts[row], "image": thumb(train_images[row])}
            example = {"id": train_ids[row], "direction": direction, "generated": generated,
                       "query": {observed: truth[observed]}, "truth": {generated: truth[generated]}, "variants": []}
            for r in done:
                c = r.completion[generated]
                at = np.flatnonzero(c["rows"] == row)
                if at.size == 0:  # this variant retrieved nothing usable for the row
                    continue
                ids, scores, best = c["cands"][int(at[0])]
                example["variants"].append({
                    "name": r.name, "label": r.label, "retrieved": entry(r.kb, ids[0], ("text", "image")),
                    "candidates": [entry(r.kb, i, (generated,)) | {"score": s} for i, s in zip(ids, scores)],
                    "chosen": best})
            out.append(example)
    return out
