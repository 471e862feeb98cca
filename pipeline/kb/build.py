"""The knowledge-base build out of core (the driver): from embeddings in the clip-retrieval layout to a saved KB.

Every step reads bounded pieces, so the driver's memory does not grow with the corpus (the plan follows
autofaiss, NeMo Curator's semantic k-means and FAISS's recipe for indexes that do not fit in RAM):

1. **fit** (one Ray task): on bounded random samples, train the mapping MLP on internal pairs, fit the
   filter's k-means on both sides (:func:`rag4dmc.pipeline.core.cluster_filter.fit_filter`), and the CSLS/Procrustes rotation W
   on a sample of the external rows the filter keeps; the calibration runs on the same samples.
2. **purify** (a streaming Ray Data pass, one task per layout shard): assign every external row to its
   cluster, drop what the filter drops, rotate the rest by W; internal rows pass through. Each task writes
   one purified part (float16 vectors, entries by reference) in the same layout, and skips a part already
   written (resume).
3. **index** (one Ray task per index shard, over a range of global row ids): each modality's index is
   trained once on a random sample, then populated from the parts, written with its rows' float16 vectors
   (memory-mapped by the readers, for the exact rerank and the fusion cross term), and its recall@10
   against exact search measured on sampled queries.
4. **entries**: the parts' metadata streamed into one memory-mapped Arrow file (id, source, text and where
   the image is: ``image_uri``, or ``image_shard`` + ``image_row``; never the image bytes).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

import numpy as np

from rag4dmc.actors.resources import use_assigned_cpus
from rag4dmc.pipeline.config import KBConfig, Stream
from rag4dmc.pipeline.core.cluster_filter import (
    sample_ids,
)
from rag4dmc.pipeline.core.index import RECALL_K
from rag4dmc.pipeline.core.retrieval import MODALITIES
from rag4dmc.pipeline.kb.build_entries import unmark, write_entries
from rag4dmc.pipeline.kb.build_fit import fingerprint, fit, resumed_fit, save_fit
from rag4dmc.pipeline.kb.build_index import (
    build_index_shard,
    recall_report,
    save_search_params,
    train_indexes,
    warn_if_below_min,
)
from rag4dmc.pipeline.kb.build_memory import (
    check_memory,
    estimate_memory,
    fresh_worker,
    host_bytes,
    largest_node_bytes,
    peak_rss,
    ray_cpus,
    spread_cpus,
)
from rag4dmc.pipeline.kb.build_purify import purification_report, purify_row, purify_shard
from rag4dmc.pipeline.kb.build_sides import EXTERNAL, INTERNAL, Side, open_side, purified_parts

log = logging.getLogger(__name__)

@dataclass
class BuildInputs:
    """Where the build's embeddings are, and what they must match."""

    internal: str  # a layout folder
    external: str | None
    out: str
    dims: tuple[int, int]  # (image, text) of the KB's encoder
    encoder_info: dict
    storage_options: dict | None = None
    columns: dict | None = None  # the input columns (where image_shard rows keep their image), for the manifest
    report: dict | None = None  # more for report.json (e.g. the embedding stage's counts)


def _stage(report: dict, name: str, t0: float, peaks: list[int], anon: list[int] = ()) -> None:
    """A stage's wall time and its largest task's peak RSS (and peak anonymous memory, where sampled: RSS also
    counts the page cache of memory-mapped files the task read)."""
    stage = {"seconds": round(time.perf_counter() - t0, 3), "task_peak_rss_bytes": int(max(peaks, default=0))}
    if anon:
        stage["task_peak_anon_bytes"] = int(max(anon))
    report.setdefault("stages", {})[name] = stage


class RayTasks:
    """Runs the steps as Ray tasks on the connected cluster (``rag4dmc kb build``): each task reserves the memory
    its step is estimated to need, and the parallel steps share the cluster's CPUs out."""

    def __init__(self, cfg: KBConfig):
        self.cfg = cfg
        self.node_bytes = largest_node_bytes()
        self.node_cpus, self.cluster_cpus = ray_cpus()
        self.single = cfg.build.single_task_cpus or self.node_cpus
        if max(self.single, cfg.build.task_cpus) > self.node_cpus:
            raise ValueError(f"build.single_task_cpus {self.single} / build.task_cpus {cfg.build.task_cpus}: the "
                             f"largest Ray node has {self.node_cpus:g} CPUs, so such a task would never be "
                             "scheduled; lower them")
        self.estimate: dict = {}

    def check(self, estimate: dict) -> None:
        """Refuse a build whose steps would not fit the largest node (or the driver's host)."""
        check_memory(estimate, self.node_bytes, host_bytes())
        self.estimate = estimate

    def _task(self, fn, step: str, cpus: float):
        import ray

        return ray.remote(num_cpus=cpus, memory=min(self.estimate[step], self.node_bytes),
                          **fresh_worker(self.estimate[step]))(_with_assigned_cpus(fn))

    def _spread(self, n_tasks: int) -> float:
        return spread_cpus(n_tasks, self.cfg.build.task_cpus, self.node_cpus, self.cluster_cpus)

    def share(self, value):
        """``value`` put once in the object store, for every task that takes it."""
        import ray

        return ray.put(value)

    def one(self, fn, step: str, *args):
        """``fn(*args)`` as one task with the node's CPUs (fit, index training)."""
        import ray

        log.info("%s: one task, %g CPUs", step, self.single)
        return ray.get(self._task(fn, step, self.single).remote(*args))

    def each(self, fn, step: str, calls: list[tuple]) -> list:
        """``fn(*args)`` for each args in ``calls``, as parallel tasks."""
        import ray

        remote = self._task(fn, step, self._spread(len(calls)))
        return ray.get([remote.remote(*args) for args in calls])

    def purify(self, items: list[dict]) -> list[dict]:
        """The purify pass, streaming: one Ray Data task per layout shard."""
        import ray

        fitted = ray.put(items[0]["fitted"])  # the same fit for every shard: put once, read by reference
        items = [{**item, "fitted": fitted} for item in items]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        step = self.estimate["purify"]
        return list(ds.map(purify_row, num_cpus=self._spread(len(items)), memory=min(step, self.node_bytes),
                           **fresh_worker(step)).iter_rows())


class InProcess:
    """Runs the steps in this process, one after another: for input that is already in memory
    (:func:`rag4dmc.pipeline.kb.in_memory.build_knowledge_base`: the evaluation, tests), no Ray."""

    def check(self, estimate: dict) -> None:
        """Nothing to check: the input is in this process's memory already."""

    def share(self, value):
        return value

    def one(self, fn, step: str, *args):
        return fn(*args)

    def each(self, fn, step: str, calls: list[tuple]) -> list:
        return [fn(*args) for args in calls]

    def purify(self, items: list[dict]) -> list[dict]:
        return [purify_shard(item) for item in items]


def build(inputs: BuildInputs, cfg: KBConfig = KBConfig(), runner: RayTasks | InProcess | None = None) -> dict:
    """Fit, purify, index and save the knowledge base at ``inputs.out``; returns its manifest and report.

    ``runner`` runs the steps: Ray tasks on the connected cluster (the default), or :class:`InProcess`."""
    from rag4dmc.pipeline.core.index import choose_kind
    from rag4dmc.pipeline.kb import store as kb_store

    runner = runner or RayTasks(cfg)
    opts = inputs.storage_options
    t_all = time.perf_counter()
    internal = open_side(INTERNAL, inputs.internal, opts, inputs.dims)
    if internal.rows < 4:
        raise ValueError(f"{inputs.internal} has {internal.rows} complete image-text pairs; the mapping needs at "
                         "least 4 (the internal part of the KB is the complete pairs)")
    external = open_side(EXTERNAL, inputs.external, opts, inputs.dims) if inputs.external else None
    n_ext = external.rows if external is not None and cfg.use_external else 0
    largest = max(sh.rows for side in (internal, external) if side is not None for sh in side.shards)
    estimate = estimate_memory(internal.rows, n_ext, inputs.dims, cfg, largest)
    runner.check(estimate)
    log.info("kb build: %d internal and %d external rows; estimated peaks %s", internal.rows, n_ext,
             {k: f"{v / 2**30:.2f} GiB" for k, v in estimate.items() if k != "sizes"})
    unmark(inputs.out, opts)  # a KB folder being rebuilt is not a KB until its new manifest is written

    # 1. fit (or the fit of an interrupted build of the same inputs and config)
    t0 = time.perf_counter()
    key = fingerprint(internal, external if n_ext else None, cfg)
    fitted = resumed_fit(inputs.out, key, opts)
    resumed = fitted is not None
    sizes = estimate["sizes"]
    if fitted is None:
        log.info("fit (minutes on a large corpus): the mapping on %d internal pairs, k-means on %d internal + %d "
                 "external rows, W on up to %d rows per side", sizes["internal_sample"],
                 sizes["kmeans_internal"], sizes["kmeans_external"], sizes["align_rows"])
        fitted = runner.one(fit, "fit", internal, external if n_ext else None, cfg, opts, inputs.columns)
        save_fit(inputs.out, key, fitted, opts)
        log.info("fit done in %.0f s", time.perf_counter() - t0)
    else:
        log.info("fit: reusing the fit of an interrupted build of the same inputs and settings")
    cfg = fitted.cfg
    report = {**(inputs.report or {}), **fitted.report, "fit_resumed": resumed,
              "memory_estimate_bytes": {k: int(v) for k, v in estimate.items() if k != "sizes"},
              "sizes": estimate["sizes"]}
    _stage(report, "fit", t0, [fitted.peak_rss])
    # 2. purify (one task per layout shard; a written part is skipped)
    t0 = time.perf_counter()
    sides = (internal, *([external] if n_ext else []))
    counts = runner.purify([{"side": s.name, "shard": sh, "out": inputs.out, "storage_options": opts,
                             "fitted": fitted} for s in sides for sh in s.shards])
    _stage(report, "purify", t0, [c["peak_rss"] for c in counts])
    report["resumed_parts"] = sum(bool(c.get("resumed")) for c in counts)
    if n_ext:
        report["external_rows"] = n_ext
        if fitted.filters is not None:
            report.update(purification_report(fitted, [c for c in counts if c["side"] == EXTERNAL]))
        else:
            report["purification"] = "disabled"
    parts = Side("kb", inputs.out, purified_parts(inputs.out, opts, sides))
    n = parts.rows
    log.info("purify done in %.0f s: %d rows in the KB", report["stages"]["purify"]["seconds"], n)
    # 3. index: trained once, then one task per shard over a range of global row ids
    t0 = time.perf_counter()
    kind = choose_kind(n, cfg.index, max(inputs.dims))
    n_shards = max(1, min(estimate["sizes"]["shards"], n))
    log.info("index (%s): trained on a random sample in one task, then populated by %d shard task(s)", kind,
             n_shards)
    parts_ref = runner.share(parts)
    trained = runner.one(train_indexes, "train", parts_ref, kind, cfg, opts)
    query_ids = sample_ids(n, cfg.index.recall_queries, (cfg.filter.seed, Stream.RECALL_QUERIES))
    queries = runner.share({m: parts.read(query_ids, m, opts) for m in MODALITIES})
    trained_ref = runner.share({m: trained[m] for m in MODALITIES})
    bounds = np.linspace(0, n, n_shards + 1).astype(int)
    results = runner.each(build_index_shard, "index", [
        ({"start": int(a), "stop": int(b), "shard": i, "kind": kind, "path": kb_store.shard_dir(i), "cfg": cfg,
          "out": inputs.out, "storage_options": opts}, parts_ref, trained_ref, queries)
        for i, (a, b) in enumerate(zip(bounds, bounds[1:]))])
    _stage(report, "index", t0, [trained["peak_rss"], *(r["peak_rss"] for r in results)],
           [r["peak_anon"] for r in results])
    report["index_kind"] = kind
    report["index_train_rows"] = trained["train_rows"]
    report["recall"] = recall_report(results, query_ids, cfg.index.min_recall)
    save_search_params(inputs.out, [kb_store.shard_dir(i) for i in range(n_shards)], report["recall"], cfg, opts)
    log.info("index done in %.0f s: recall@%d %s at nprobe %s, rerank_factor %s", report["stages"]["index"]["seconds"],
             RECALL_K, {m: report["recall"][m] for m in MODALITIES}, report["recall"]["nprobe"],
             report["recall"]["rerank_factor"])
    warn_if_below_min(report["recall"])
    # 4. entries, mapping, report, manifest (last: it marks the KB complete)
    t0 = time.perf_counter()
    rows, entries_sha = write_entries(parts, f"{inputs.out}/{kb_store.ENTRIES_FILE}", opts)
    _stage(report, "entries", t0, [])
    report["kb_rows"] = rows
    report["calibration"] = fitted.calibration if fitted.calibration is not None else (
        "disabled" if not cfg.calibration.enabled else "skipped: too few internal pairs to hold any out")
    report["build_seconds"] = round(time.perf_counter() - t_all, 3)
    report["driver_peak_rss_bytes"] = peak_rss()
    manifest = kb_store.new_manifest(
        encoder=inputs.encoder_info, rows=rows, dims=inputs.dims, cfg=cfg, calibration=fitted.calibration,
        shards=[{"start": int(a), "stop": int(b), "path": kb_store.shard_dir(i)}
                for i, (a, b) in enumerate(zip(bounds, bounds[1:]))],
        content=[entries_sha.encode(), *(r[m]["sha256"].encode() for r in results for m in MODALITIES)],
        input_columns=inputs.columns)
    kb_store.write_small(inputs.out, fitted.mapping, report, manifest, opts)
    kb_store.remove_parts(inputs.out, opts)
    log.info("knowledge base %s: %d rows in %d shards (%s), recall@10 %s", manifest["version"], rows, n_shards,
             kind, {m: report["recall"][m] for m in MODALITIES})
    return {"version": manifest["version"], "rows": rows, "report": report, "out": inputs.out}


def confidence_lines(calibration: dict | None) -> list[str]:
    """What a user reads before choosing ``min_confidence``: per direction, the confidence model's calibration on
    held-out pairs and, per threshold, the share of rows kept and how many of them are faithful."""
    lines = []
    for task, chosen in ((calibration or {}).get("directions") or {}).items():
        conf = chosen.get("confidence")
        if conf is None:
            lines.append(f"confidence {task}: no model (too few held-out pairs)")
            continue
        lines.append(f"confidence {task}: {conf['pairs']} held-out pairs, {conf['faithful_rate']:.0%} faithful "
                     f"(closer to the truth than {conf['faithful_share']:.0%} of the KB); cross-fitted ECE "
                     f"{conf['ece']:.3f}, AUROC {conf['auroc']:.2f}")
        lines.append("  min_confidence: " + "; ".join(
            f"at {row['threshold']:.1f}: {row['coverage']:.0%} kept, "
            + ("none" if row["precision"] is None else f"{row['precision']:.2f} faithful")
            for row in conf["coverage_precision"]))
    return lines


def _with_assigned_cpus(fn):
    """``fn`` run with as many BLAS/torch/FAISS threads as the Ray task reserved CPUs."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        use_assigned_cpus()
        return fn(*args, **kwargs)

    return run
