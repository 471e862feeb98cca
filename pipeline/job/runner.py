"""The completion job's run: identity, resume, retry of failed rows and the summary (the plan: ``rag4dmc.pipeline.job.mapper``).

Resume: rerunning the same command skips the rows already committed under ``--out`` (each input shard's
read asks its shard's output folder, ``rag4dmc.pipeline.job.writer.committed_keys``). A run folder records the config
hash, KB version and output format, and a different config, KB or format is refused instead of mixing with
old output.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow.compute as pc

from rag4dmc.actors import faults
from rag4dmc.actors.resources import use_gpus
from rag4dmc.pipeline.config import ConfigError, JobConfig
from rag4dmc.pipeline.io import datasets
from rag4dmc.pipeline.io.shared_paths import check_local_paths
from rag4dmc.pipeline.io.storage import Storage
from rag4dmc.pipeline.job import retry_swap
from rag4dmc.pipeline.job.census import Census, take_census
from rag4dmc.pipeline.job.mapper import DIRECTIONS, build_plan, write
from rag4dmc.pipeline.job.reader import shard_name
from rag4dmc.pipeline.job.scaling import Capacity, read_capacity
from rag4dmc.pipeline.job.writer import (
    count_output_rows,
    read_output,
)
from rag4dmc.pipeline.kb import store as kb_store
from rag4dmc.pipeline.schema import RETRIES, STAGES, TASK_I2T, TASK_T2I

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"


class RunMismatch(RuntimeError):
    """The output folder holds a run made with another config or knowledge base."""


class OutputNotWritable(ConfigError):
    """``--out`` cannot be written (a missing bucket, no permission): found before any actor starts."""


def check_output(storage: Storage, out: str) -> None:
    """Write and remove a probe object under ``out``: a missing bucket or a denied write fails here, on the
    driver, with the URI, not in a commit after hours of generation; nothing is left behind."""
    probe = f"{out.rstrip('/')}/.write-check-{uuid.uuid4().hex[:12]}"
    try:
        storage.write_bytes(probe, b"")
        storage.remove(probe)
    except Exception as exc:  # noqa: BLE001 - any failure to write is the output's; the message says which
        raise OutputNotWritable(
            f"cannot write to --out {out} ({type(exc).__name__}: {exc}): check that the bucket or folder exists "
            "and that these credentials may write and delete there") from None


@dataclass
class JobSpec:
    data: str
    kb: str
    out: str
    cfg: JobConfig = field(default_factory=JobConfig)
    data_format: str = "auto"
    retry_failed: bool = False
    dry_run: bool = False


def _check_run(storage: Storage, spec: JobSpec, kb_version: str) -> dict:
    """Record or verify the run's identity: a different config, KB or output format never mixes with old output.

    The output format is not part of the config hash (it changes the files, not the rows, whose config_hash
    the service shares); it is checked on its own.
    """
    run = {"config_hash": spec.cfg.config_hash(), "kb_version": kb_version, "data": spec.data,
           "output_format": spec.cfg.output_format,
           "config": spec.cfg.model_dump(mode="json", exclude={"resources", "storage"})}
    path = f"{spec.out}/{RUN_FILE}"
    if storage.exists(path):
        old = json.loads(storage.read_bytes(path))
        old_format = old.get("output_format", "parquet")  # runs from before the option wrote parquet
        if old_format != run["output_format"]:
            raise RunMismatch(
                f"{spec.out} holds {old_format} output, this run writes {run['output_format']}: resume it with "
                f"--output-format {old_format}, or write to a new --out folder (the formats must not mix)")
        for key in ("config_hash", "kb_version", "data"):
            if old.get(key) != run[key]:
                raise RunMismatch(
                    f"{spec.out} holds a run with {key}={old.get(key)!r}, this run has {run[key]!r}; "
                    "write to a new --out folder (old and new output must not mix)")
        return old
    storage.write_bytes(path, json.dumps(run, indent=2).encode())
    return run


def preflight(cfg: JobConfig, kb_manifest: dict | None = None) -> None:
    """Fail on the driver, before any actor starts, on settings that cannot work (with this KB, when given)."""
    from rag4dmc.actors.niqe import NiqeScorer
    from rag4dmc.pipeline.config import ConfigError
    from rag4dmc.pipeline.core.knn import EmbeddingError
    from rag4dmc.pipeline.core.retrieval import check_mode
    from rag4dmc.pipeline.core.selection import wants_niqe

    if wants_niqe(cfg.selection):
        NiqeScorer.check_params(cfg.selection.niqe_params)
    if kb_manifest is not None:
        try:
            check_mode(cfg.retrieval, kb_manifest["image_dim"], kb_manifest["text_dim"])
        except EmbeddingError as exc:
            raise ConfigError(str(exc)) from None


def run_job(spec: JobSpec) -> dict:
    """Complete every row of ``spec.data`` into ``spec.out``; returns (and writes) the summary. With
    ``spec.dry_run``, returns the plan (:func:`dry_run`) and starts nothing."""
    import ray

    storage = Storage(spec.cfg.storage)
    kb = kb_store.load(spec.kb, storage.options, shards=[], with_entries=False)  # the manifest only
    preflight(spec.cfg, kb.manifest)
    if spec.dry_run:
        if not ray.is_initialized():
            ray.init(log_to_driver=False)
        return dry_run(spec, kb.manifest, storage)
    summary_path = f"{spec.out}/{SUMMARY_FILE}"
    finished = storage.exists(summary_path) and not spec.retry_failed
    if not finished:
        check_output(storage, spec.out)
    _check_run(storage, spec, kb.version)
    retry_swap.recover(storage, spec.out)  # a killed --retry-failed: finished, or undone (it logs which)
    if finished:
        log.info("%s already holds a finished run; nothing to do (use --retry-failed to redo failed rows)", spec.out)
        return json.loads(storage.read_bytes(summary_path))
    if not ray.is_initialized():
        faults.register_job()  # a testing aid: nothing unless RAG4DMC_FAULTS is set
        ray.init(log_to_driver=False)
    capacity = read_capacity()  # read once: the path check and the plan's pool sizes
    check_local_paths({"--data": spec.data, "--kb": spec.kb, "--out": spec.out}, capacity.autoscaling)

    t0 = time.perf_counter()
    if spec.retry_failed:
        written = _retry_failed(spec, storage, kb.manifest, capacity)
    else:
        before = count_output_rows(storage, spec.out)
        if before:
            log.info("resuming: %d rows already committed under %s are skipped", before, spec.out)
        in_flight, used = write(_plan(spec, kb.manifest, storage, spec.out, capacity), spec.out, spec.cfg.storage,
                                spec.cfg.output_format)
        written = count_output_rows(storage, spec.out) - before
    elapsed = time.perf_counter() - t0
    summary = summarize(storage, spec.out, elapsed, written)
    if not spec.retry_failed:
        summary["in_flight"] = in_flight
        summary.update(used)
    storage.write_bytes(summary_path, json.dumps(summary, indent=2).encode())  # marks the run finished
    return summary


def _census(spec: JobSpec, storage: Storage) -> Census:
    census = take_census(spec.data, spec.cfg.columns, storage.options, spec.data_format, spec.cfg.census_shards)
    log.info("rows to complete, from %d of %d shards: about %d image -> text, %d text -> image", census.shards_read,
             census.shards, census.rows(TASK_I2T), census.rows(TASK_T2I))
    return census


def _plan(spec: JobSpec, manifest: dict, storage: Storage, out: str, capacity: Capacity,
          shards: list[str] | None = None, keys: set[str] | None = None):
    census = _census(spec, storage)
    return build_plan(spec.cfg, spec.data, spec.kb, manifest, out, storage, use_gpus(spec.cfg.accelerators),
                      capacity, spec.data_format, shards=shards, keys=keys,
                      shares={task: census.share(task) for task, _ in DIRECTIONS})


def dry_run(spec: JobSpec, manifest: dict, storage: Storage) -> dict:
    """What the job would do on this cluster, before anything starts: its pools and their sizes, the rows per
    direction (``rag4dmc.pipeline.job.census``) and the expected device-hours and wall time from the pools' declared costs
    (``Resources.seconds_per_row``). Printed, and returned."""
    from rag4dmc.pipeline.job.mapper import actor_pools, describe_pools, direction_stages, plan_resources
    from rag4dmc.pipeline.job.scaling import device, expected_rate

    cfg = spec.cfg
    census = _census(spec, storage)
    shares = {task: census.share(task) for task, _ in DIRECTIONS}
    chains = {task: direction_stages(task, cfg, spec.kb, manifest, storage.options) for task, _ in DIRECTIONS}
    capacity = read_capacity()
    has_gpu = use_gpus(cfg.accelerators)
    pools = actor_pools(cfg, chains, has_gpu, shares)
    sized = plan_resources(cfg, chains, has_gpu, capacity, shares)
    todo = census.rows(TASK_I2T) + census.rows(TASK_T2I)
    hours = {"GPU": 0.0, "CPU": 0.0}
    for pool in pools.values():
        hours[device(pool.resources)] += pool.resources.seconds_per_row * pool.row_share * todo / 3600
    rate = expected_rate(pools, sized)
    plan = {
        "cluster": capacity.describe(),
        "rows": {t: census.rows(t) for t in census.counted}, "rows_estimated_from_shards":
            [census.shards_read, census.shards],
        "pools": {n: {"min_actors": r.min_actors, "max_actors": r.max_actors, "num_gpus": r.num_gpus,
                      "num_cpus": r.num_cpus, "seconds_per_row": r.seconds_per_row} for n, r in sized.items()},
        "gpu_hours": float(f"{hours['GPU']:.4g}"), "cpu_core_hours": float(f"{hours['CPU']:.4g}"),
        "rows_per_second": float(f"{rate:.4g}"), "wall_seconds": float(f"{todo / rate:.4g}") if todo else 0.0,
    }
    exact = "" if census.exact else f" (estimated from {census.shards_read} of {census.shards} shards)"
    print(f"cluster: {plan['cluster']}")
    print(f"rows{exact}: " + ", ".join(f"{n} {t}" for t, n in plan["rows"].items()))
    print("pools:")
    for line in describe_pools(sized, cfg):
        print(f"  {line}")
    print(f"expected, from the pools' costs per row (declared, or resources.<pool>.seconds_per_row): {plan['gpu_hours']:g} GPU-hours, {plan['cpu_core_hours']:g} "
          f"CPU core-hours, {plan['rows_per_second']:g} rows/s, {plan['wall_seconds'] / 3600:.3g} hours of wall time")
    return plan


def summarize(storage: Storage, out: str, elapsed: float, rows_this_run: int | None) -> dict:
    """Counts, throughput and actor-seconds per completed row per stage, over the whole output."""
    cols = ["row_key", "status", "generated", RETRIES, *[f"seconds_{s}" for s in STAGES]]
    table = read_output(storage, out, cols)
    status = np.asarray(table.column("status").to_pylist(), dtype=object) if table.num_rows else np.array([])
    completed = int((status == "completed").sum())
    summary = {
        "rows_out": table.num_rows,
        "unique_row_keys": len(set(table.column("row_key").to_pylist())) if table.num_rows else 0,
        "observed": int((status == "observed").sum()),
        "completed": completed,
        "abstained": int((status == "abstained").sum()),
        "failed": int((status == "failed").sum()),
        "completed_text": int(sum(g == "text" for g in table.column("generated").to_pylist())) if completed else 0,
        "completed_image": int(sum(g == "image" for g in table.column("generated").to_pylist())) if completed else 0,
        "seconds": round(elapsed, 3),
        "rows_this_run": rows_this_run,
    }
    retries = pc.fill_null(table.column(RETRIES), 0).to_numpy() if table.num_rows else np.zeros(0)  # null: older file
    # batch retries after transient errors: rows whose batch was retried, and the retries summed over rows
    summary["rows_retried"] = int((retries > 0).sum())
    summary["row_retries"] = int(retries.sum())
    done = rows_this_run if rows_this_run is not None else table.num_rows
    summary["rows_per_second"] = round(done / elapsed, 2) if elapsed > 0 else None
    summary["actor_seconds_per_completed_row"] = {
        s: round(float(np.sum(table.column(f"seconds_{s}").to_numpy(zero_copy_only=False))) / max(completed, 1), 5)
        for s in STAGES
    } if table.num_rows else {}
    return summary


def _retry_failed(spec: JobSpec, storage: Storage, manifest: dict, capacity: Capacity) -> int:
    """Recompute the rows marked failed and swap them into the output, each exactly once."""
    table = read_output(storage, spec.out, ["row_key", "status", "source_shard"])
    failed = [k for k, s in zip(table.column("row_key").to_pylist(), table.column("status").to_pylist())
              if s == "failed" and ":error:" not in k]  # unreadable-input rows have nothing to retry
    if not failed:
        log.info("no failed rows to retry")
        return 0
    shard_names = sorted({k.rsplit(":", 1)[0] for k in failed})
    root = spec.data.rstrip("/")
    listed = datasets.list_shards(spec.data, storage.options, spec.data_format)
    shards = [s for s in listed if shard_name(s, root) in shard_names]
    staging = retry_swap.staging_dir(spec.out)
    write(_plan(spec, manifest, storage, staging, capacity, shards=shards, keys=set(failed)), staging, spec.cfg.storage,
          spec.cfg.output_format)  # its usage figures are the retry's alone: the summary keeps the first run's
    return retry_swap.swap_in(storage, spec.out, shard_names)
