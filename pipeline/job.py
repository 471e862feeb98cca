"""The completion job on Ray Data: the plan, the run folder, resume, retry and the summary.

Plan (one ``map_batches`` per stage; actor pools sized from each actor class's ``RESOURCES``)::

    read shards -> route rows -> i2t: decode+resize (task) -> embed image -> retrieve -> caption
                              -> t2i: check text (task)    -> embed text  -> retrieve -> paint  -> finalize -> parquet

Image->text and text->image rows have their own GPU pools; each stage processes only its rows and passes
the others (observed, failed, the other direction) through unchanged. Resume uses Ray
Data's checkpointing (id column ``row_key``, two-phase commit of output files): rerunning the same
command skips rows already written. A run folder records the config hash and KB version, and a
different config or KB is refused instead of mixing with old output.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from actors.complete import CompleteImages, CompleteTexts
from actors.embed import EmbedQueries
from actors.preprocess import CPU_TASK, check_texts, decode_for_model, route
from actors.resources import Resources, fit_to_cpus, use_gpus
from actors.retrieve import RetrieveNeighbours
from pipeline import kb as kbmod
from pipeline.calibrate import effective_settings
from pipeline.config import EncoderConfig, JobConfig
from pipeline.datasource import ROW_KEY, ShardDatasource
from pipeline.output import finalize
from pipeline.schema import STAGES, TASK_I2T, TASK_T2I, ray_stage
from pipeline.storage import Storage

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
DATA_DIR = "data"
CHECKPOINT_DIR = "_checkpoint"
# Ray Data runs its checkpoint filter (on resume) as an actor pool whose actors take one CPU each.
CHECKPOINT_FILTER_CPUS = 1.0
# CPU tasks (a read and a map) that must be able to run beside the actor pools.
TASK_CPU_HEADROOM = 2


class RunMismatch(RuntimeError):
    """The output folder holds a run made with another config or knowledge base."""


def select_tasks(batch: dict[str, np.ndarray], *, tasks: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Keep the rows whose ``task`` is one of ``tasks`` (the branch split)."""
    keep = np.isin(np.asarray(batch["task"], dtype=object), tasks)
    return {k: np.asarray(v)[keep] for k, v in batch.items()}


@dataclass
class JobSpec:
    data: str
    kb: str
    out: str
    cfg: JobConfig = field(default_factory=JobConfig)
    data_format: str = "auto"
    retry_failed: bool = False


def shard_groups(n_shards: int, max_per_actor: int) -> list[list[int]]:
    """Consecutive shard ids per retrieval stage; a small KB is one stage holding every shard."""
    ids = list(range(n_shards))
    return [ids[i : i + max_per_actor] for i in range(0, n_shards, max_per_actor)] or [[]]


def plan_resources(cfg: JobConfig, encoder: EncoderConfig, n_groups: int, has_gpu: bool, cluster_cpus: float,
                   resuming: bool, cluster_memory_gb: float | None = None) -> dict[str, Resources]:
    """Each actor pool's resources: the class declaration, the config's override, then fitted to the cluster.

    Pools are keyed ``<stage>:<direction>[:<shard group>]``. The CPUs left for them are the cluster's less
    the tasks' share (a read and a map task at a time) and, when resuming, the CPU Ray Data's checkpoint
    filter actor takes; without that room a small machine waits forever.
    """
    from actors.encoders import encoder_class

    res = cfg.resources
    declared = {"embed": encoder_class(encoder).RESOURCES, "retrieve": RetrieveNeighbours.RESOURCES}
    gen = {TASK_I2T: CompleteTexts.resources(cfg.generator), TASK_T2I: CompleteImages.resources(cfg.generator)}
    pools: dict[str, Resources] = {}
    for task in (TASK_I2T, TASK_T2I):
        pools[f"embed:{task}"] = declared["embed"].with_overrides(res.get("embed"))
        for g in range(n_groups):
            pools[f"retrieve:{task}:{g}"] = declared["retrieve"].with_overrides(res.get("retrieve"))
        pools[f"generate:{task}"] = gen[task].with_overrides(res.get("generate"))
    pools = {k: r.for_gpu(has_gpu) for k, r in pools.items()}
    for name, r in pools.items():
        if cluster_memory_gb and r.memory_gb > cluster_memory_gb:
            log.warning("pool %s asks for %.1f GiB per actor but the cluster has %.1f GiB now; it starts only once "
                        "a larger node joins (set resources.%s.memory_gb to what the model needs)",
                        name, r.memory_gb, cluster_memory_gb, name.split(":")[0])
    budget = cluster_cpus - TASK_CPU_HEADROOM * CPU_TASK.num_cpus - (CHECKPOINT_FILTER_CPUS if resuming else 0.0)
    return dict(zip(pools, fit_to_cpus(list(pools.values()), budget)))


def build_plan(spec: JobSpec, kb_manifest: dict, storage: Storage, shards: list[str] | None = None,
               keys: set[str] | None = None, resuming: bool = False):
    """The Ray Data dataset that completes ``spec.data`` (only ``shards`` / ``keys`` if given)."""
    import ray

    from actors.encoders import encoder_image_size

    cfg = spec.cfg
    has_gpu = use_gpus(cfg.accelerators)
    encoder = EncoderConfig.model_validate(kb_manifest["config"]["encoder"])
    groups = shard_groups(len(kb_manifest["shards"]), cfg.shards_per_actor)
    cluster = ray.cluster_resources()
    pools = plan_resources(cfg, encoder, len(groups), has_gpu, cluster.get("CPU", 0.0), resuming,
                           cluster.get("memory", 0.0) / 1024**3)
    for name, r in pools.items():
        log.debug("pool %s: %s", name, r)

    source = ShardDatasource(spec.data, cfg.columns, storage.options, spec.data_format, shards=shards, keys=keys)
    cpu = {"num_cpus": CPU_TASK.num_cpus, "batch_size": CPU_TASK.batch_size, "batch_format": "numpy"}
    ds = ray.data.read_datasource(source, ray_remote_args={"num_cpus": CPU_TASK.num_cpus})
    ds = ds.map_batches(ray_stage(route), fn_kwargs={"storage_options": storage.options}, **cpu)

    def stages(b, task: str, observed: str, prepare, prepare_kwargs, complete_cls):
        """The stages of one direction; each touches only rows of ``task`` and passes the others through."""
        retrieval, selection, settings = effective_settings(cfg.retrieval, cfg.selection,
                                                            kb_manifest.get("calibration"), task)
        log.info("%s runs with %s", task, settings)
        b = b.map_batches(ray_stage(prepare), fn_kwargs=prepare_kwargs, **cpu)
        b = b.map_batches(ray_stage(EmbedQueries), fn_constructor_kwargs={"encoder": encoder, "modality": observed},
                          batch_format="numpy", **pools[f"embed:{task}"].map_batches_kwargs())
        for g, group in enumerate(groups):
            b = b.map_batches(
                ray_stage(RetrieveNeighbours),
                fn_constructor_kwargs={"kb_uri": spec.kb, "storage_options": storage.options, "shards": group,
                                       "observed": observed, "retrieval": retrieval,
                                       "last": g == len(groups) - 1},
                batch_format="numpy", **pools[f"retrieve:{task}:{g}"].map_batches_kwargs())
        return b.map_batches(
            ray_stage(complete_cls),
            fn_constructor_kwargs={"generator": cfg.generator, "selection": selection, "encoder": encoder,
                                   "entries": spec.kb, "storage_options": storage.options, "settings": settings},
            batch_format="numpy", **pools[f"generate:{task}"].map_batches_kwargs())

    # One chain over one read: Ray Data's checkpoint filter adds an actor pool per read, so separate
    # branches (one read each) would triple it and starve a small machine. Each direction still has
    # its own embed / retrieve / generate pools, sized from its own actors' declarations.
    ds = stages(ds, TASK_I2T, "image", decode_for_model,
                {"size": encoder_image_size(encoder), "max_pixels": encoder.max_image_pixels}, CompleteTexts)
    ds = stages(ds, TASK_T2I, "text", check_texts, {}, CompleteImages)
    fin = {"fn_kwargs": {"kb_version": kb_manifest["version"], "config_hash": cfg.config_hash()}, **cpu}
    return ds.map_batches(finalize, **fin)


def _check_run(storage: Storage, spec: JobSpec, kb_version: str) -> dict:
    """Record or verify the run's identity: a different config or KB never mixes with old output."""
    run = {"config_hash": spec.cfg.config_hash(), "kb_version": kb_version, "data": spec.data,
           "config": spec.cfg.model_dump(mode="json", exclude={"resources", "storage"})}
    path = f"{spec.out}/{RUN_FILE}"
    if storage.exists(path):
        old = json.loads(storage.read_bytes(path))
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
    from pipeline.config import ConfigError
    from pipeline.knn import EmbeddingError
    from pipeline.retrieval import check_mode
    from pipeline.selection import NiqeScorer, wants_niqe

    if wants_niqe(cfg.selection):
        NiqeScorer.check_params(cfg.selection.niqe_params)
    if kb_manifest is not None:
        try:
            check_mode(cfg.retrieval, kb_manifest["image_dim"], kb_manifest["text_dim"])
        except EmbeddingError as exc:
            raise ConfigError(str(exc)) from None


def run_job(spec: JobSpec) -> dict:
    """Complete every row of ``spec.data`` into ``spec.out``; returns (and writes) the summary."""
    import ray
    from ray.data.checkpoint import CheckpointConfig

    storage = Storage(spec.cfg.storage)
    kb = kbmod.load(spec.kb, storage.options, shards=[], with_entries=False)  # the manifest only
    preflight(spec.cfg, kb.manifest)
    _check_run(storage, spec, kb.version)
    summary_path = f"{spec.out}/{SUMMARY_FILE}"
    if storage.exists(summary_path) and not spec.retry_failed:
        log.info("%s already holds a finished run; nothing to do (use --retry-failed to redo failed rows)", spec.out)
        return json.loads(storage.read_bytes(summary_path))
    if not ray.is_initialized():
        ray.init(log_to_driver=False)

    t0 = time.perf_counter()
    ctx = ray.data.DataContext.get_current()
    if spec.retry_failed:
        written = _retry_failed(spec, storage, kb.manifest)
    else:
        ctx.checkpoint_config = CheckpointConfig(
            id_column=ROW_KEY, checkpoint_path=storage.arrow_path(f"{spec.out}/{CHECKPOINT_DIR}"),
            delete_checkpoint_on_success=False, override_filesystem=storage.arrow_fs(spec.out))
        resuming = bool(storage.glob(f"{spec.out}/{CHECKPOINT_DIR}/*"))
        before = count_output_rows(storage, spec.out)
        if resuming:
            log.info("resuming: rows already committed under %s are skipped", spec.out)
        try:
            plan = build_plan(spec, kb.manifest, storage, resuming=resuming)
            plan.write_parquet(storage.arrow_path(f"{spec.out}/{DATA_DIR}"), filesystem=storage.arrow_fs(spec.out))
        finally:
            ctx.checkpoint_config = None
        written = count_output_rows(storage, spec.out) - before
    elapsed = time.perf_counter() - t0
    summary = summarize(storage, spec.out, elapsed, written)
    storage.write_bytes(summary_path, json.dumps(summary, indent=2).encode())  # marks the run finished
    return summary


def count_output_rows(storage: Storage, out: str) -> int:
    """Committed output rows, from the parquet footers (no data read)."""
    rows = 0
    for f in storage.glob(f"{out}/{DATA_DIR}/*.parquet"):
        with storage.open(f) as fh:
            rows += pq.read_metadata(fh).num_rows
    return rows


def read_output(storage: Storage, out: str, columns: list[str] | None = None) -> pa.Table:
    """Every committed output row of the run in ``out``."""
    files = storage.glob(f"{out}/{DATA_DIR}/*.parquet")
    if not files:
        return pa.table({c: [] for c in (columns or ["row_key"])})
    return pa.concat_tables([pq.read_table(storage.open(f), columns=columns) for f in files],
                            promote_options="default")


def summarize(storage: Storage, out: str, elapsed: float, rows_this_run: int | None) -> dict:
    """Counts, throughput and actor-seconds per completed row per stage, over the whole output."""
    cols = ["row_key", "status", "generated", *[f"seconds_{s}" for s in STAGES]]
    table = read_output(storage, out, cols)
    status = np.asarray(table.column("status").to_pylist(), dtype=object) if table.num_rows else np.array([])
    completed = int((status == "completed").sum())
    summary = {
        "rows_out": table.num_rows,
        "unique_row_keys": len(set(table.column("row_key").to_pylist())) if table.num_rows else 0,
        "observed": int((status == "observed").sum()),
        "completed": completed,
        "failed": int((status == "failed").sum()),
        "completed_text": int(sum(g == "text" for g in table.column("generated").to_pylist())) if completed else 0,
        "completed_image": int(sum(g == "image" for g in table.column("generated").to_pylist())) if completed else 0,
        "seconds": round(elapsed, 3),
        "rows_this_run": rows_this_run,
    }
    done = rows_this_run if rows_this_run is not None else table.num_rows
    summary["rows_per_second"] = round(done / elapsed, 2) if elapsed > 0 else None
    summary["actor_seconds_per_completed_row"] = {
        s: round(float(np.sum(table.column(f"seconds_{s}").to_numpy(zero_copy_only=False))) / max(completed, 1), 5)
        for s in STAGES
    } if table.num_rows else {}
    return summary


def _retry_failed(spec: JobSpec, storage: Storage, manifest: dict) -> int:
    """Recompute the rows marked failed and swap them into the output, each exactly once."""
    table = read_output(storage, spec.out, ["row_key", "status", "source_shard"])
    failed = [k for k, s in zip(table.column("row_key").to_pylist(), table.column("status").to_pylist())
              if s == "failed" and ":error:" not in k]  # unreadable-input rows have nothing to retry
    if not failed:
        log.info("no failed rows to retry")
        return 0
    shard_names = sorted({k.rsplit(":", 1)[0] for k in failed})
    root = spec.data.rstrip("/")
    shards = [f"{root}/{s}" if not s.startswith(root) else s for s in shard_names]
    staging = f"{spec.out}/_retry"
    storage.remove(staging)
    plan = build_plan(spec, manifest, storage, shards=shards, keys=set(failed))
    plan.write_parquet(storage.arrow_path(staging), filesystem=storage.arrow_fs(staging))
    new_files = storage.glob(f"{staging}/*.parquet")
    new_keys = set()
    for f in new_files:
        new_keys.update(pq.read_table(storage.open(f), columns=["row_key"]).column("row_key").to_pylist())
    for f in storage.glob(f"{spec.out}/{DATA_DIR}/*.parquet"):
        old = pq.read_table(storage.open(f))
        mask = pa.array([k not in new_keys for k in old.column("row_key").to_pylist()])
        if not all(mask.to_pylist()):
            storage.write_table(old.filter(mask), f)
    for f in new_files:
        storage.move(f, f"{spec.out}/{DATA_DIR}/retry-{int(time.time())}-{Path(f).name}")
    storage.remove(staging)
    return len(new_keys)
