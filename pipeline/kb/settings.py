"""The settings a direction of a job or of the service runs with: the user's where set, else the KB's calibrated
ones (``rag4dmc.pipeline.kb.calibrate`` chooses them at ``kb build``), else the defaults.

Apart from the calibration itself, so that a job's driver or the service, which only read a KB's calibration,
import neither the calibration's torch nor its grids.
"""

from __future__ import annotations

from rag4dmc.pipeline.config import RetrievalConfig, SelectionConfig

CALIBRATED_RETRIEVAL = ("alpha", "top_k", "n_results")  # the retrieval keys a calibration chooses
CALIBRATED_SELECTION = ("lambda_quality", "lambda_retrieval")  # and the selection keys


def effective_settings(retrieval: RetrievalConfig, selection: SelectionConfig, calibration: dict | None,
                       task: str) -> tuple[RetrievalConfig, SelectionConfig, dict]:
    """The retrieval and selection settings one direction runs with, and their provenance.

    A key the user set (in a config file or a flag: pydantic's ``model_fields_set``) wins; every other
    calibrated key takes the KB's calibrated value; the rest keep their defaults. The calibration was made
    for fusion retrieval, so another ``retrieval.mode`` leaves it unused."""
    chosen = ((calibration or {}).get("directions") or {}).get(task)
    calibrated: list[str] = []
    user = sorted([f"retrieval.{k}" for k in retrieval.model_fields_set & {*CALIBRATED_RETRIEVAL, "mode"}]
                  + [f"selection.{k}" for k in selection.model_fields_set & set(CALIBRATED_SELECTION)])
    if chosen is not None and retrieval.mode == "fusion":
        r_upd = {k: v for k, v in chosen["retrieval"].items() if k not in retrieval.model_fields_set}
        s_upd = {k: v for k, v in chosen["selection"].items() if k not in selection.model_fields_set}
        merged = retrieval.model_dump() | r_upd
        if merged["n_results"] > merged["top_k"]:  # the user's n_results with a calibrated top_k, or the reverse
            if "top_k" in r_upd:
                merged["top_k"] = merged["n_results"]
            else:
                merged["n_results"] = merged["top_k"]
        retrieval = RetrievalConfig.model_validate(merged)
        selection = selection.model_copy(update=s_upd)
        calibrated = sorted([f"retrieval.{k}" for k in r_upd] + [f"selection.{k}" for k in s_upd])
    provenance = {"task": task, "mode": retrieval.mode, **{k: getattr(retrieval, k) for k in CALIBRATED_RETRIEVAL},
                  "lambda_cos": selection.lambda_cos, **{k: getattr(selection, k) for k in CALIBRATED_SELECTION},
                  "calibrated": calibrated, "user": user}
    return retrieval, selection, provenance


def confidence_of(calibration: dict | None, task: str) -> dict | None:
    """The KB's confidence record of one direction (its model and the model's held-out checks,
    ``rag4dmc.pipeline.kb.calibrate.confidence_record``), None where the KB has none (built without calibration,
    or with too few held-out pairs to fit one)."""
    return (((calibration or {}).get("directions") or {}).get(task) or {}).get("confidence")


def confidence_model(calibration: dict | None, task: str) -> dict | None:
    """The KB's confidence model of one direction (``rag4dmc.pipeline.core.confidence``), None where it has none."""
    return (confidence_of(calibration, task) or {}).get("model")
