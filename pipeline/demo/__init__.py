"""``rag4dmc demo``: the whole method offline on a generated corpus with known ground truth."""
