"""The completion job's plan: which stages each direction runs, with what resources, as a Ray Data dataset.

Three branches, each reading only its own rows (the datasource routes rows at read time)::

    i2t rows:  read -> fetch + decode (task) -> embed image -> retrieve (shard groups) -> caption -> finalize --+
    t2i rows:  read -> check text (task)     -> embed text  -> retrieve (shard groups) -> paint   -> finalize --+-> commit
    the rest:  read (observed pairs, rows failed at read) --------------------------------------> finalize --+

No row passes through a pool that does not process it: each direction has its own embed / retrieve /
generate pools, sized from its stages' ``RESOURCES``, and complete pairs go straight to the output. The
stages of each branch are checked against each other (``rag4dmc.actors.stage.check_chain``) before any actor
starts. ``direction_stages`` is the one definition of a direction's chain: the job runs it on Ray Data,
``rag4dmc.actors.stage.run_chain`` runs it in one process (tests, the benchmark's loop).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field

from rag4dmc.actors import faults
from rag4dmc.actors.complete import CompleteImages, CompleteTexts
from rag4dmc.actors.embed import EmbedQueries
from rag4dmc.actors.preprocess import CPU_TASK, CheckTexts, FetchAndDecode
from rag4dmc.actors.resources import Resources, fit_to_cpus
from rag4dmc.actors.retrieve import RetrieveNeighbours, role_of
from rag4dmc.actors.stage import Stage, StagePolicy, check_chain, run_stage
from rag4dmc.pipeline.config import EncoderConfig, JobConfig, StageResources, StorageConfig
from rag4dmc.pipeline.job import in_flight as flow
from rag4dmc.pipeline.job import run_state
from rag4dmc.pipeline.job.pool_usage import bounding_pool, pool_usage
from rag4dmc.pipeline.job.reader import ShardDatasource
from rag4dmc.pipeline.job.scaling import Capacity, Pool, size_pools, task_rows
from rag4dmc.pipeline.job.stage_actor import actor_class
from rag4dmc.pipeline.job.writer import OutputSink, committed_keys, finalize
from rag4dmc.pipeline.kb.settings import confidence_model, effective_settings
from rag4dmc.pipeline.schema import (
    INPUT_SCHEMA,
    TASK_FAILED,
    TASK_I2T,
    TASK_OBSERVED,
    TASK_T2I,
)

log = logging.getLogger(__name__)

DIRECTIONS = ((TASK_I2T, "image"), (TASK_T2I, "text"))  # (direction, observed modality): a row's direction
# is its ``task`` column (rag4dmc.pipeline.schema); "task" alone, in this module, is a Ray task
PASS_TASKS = (TASK_OBSERVED, TASK_FAILED)  # rows that go straight to the output
# CPU tasks besides the reads that must be able to run at any time beside the actor pools: a prepare task per
# direction, a finalize per branch, the commit. Without a CPU for them, reads held back by the rows-in-flight
# limit (rag4dmc.pipeline.job.in_flight) wait for commits that cannot be scheduled.
def task_slots(n_directions: int) -> int:
    return n_directions + (n_directions + 1) + 1


def read_concurrency(cfg: JobConfig, cluster_cpus: float) -> int:
    """Read tasks at a time per branch: ``read_concurrency``, or one per 16 cluster CPUs (at least one)."""
    return cfg.read_concurrency or max(1, int(cluster_cpus // 16))


def shard_groups(n_shards: int, max_per_actor: int) -> list[list[int]]:
    """Consecutive shard ids per retrieval stage; a small KB is one stage holding every shard."""
    ids = list(range(n_shards))
    return [ids[i : i + max_per_actor] for i in range(0, n_shards, max_per_actor)] or [[]]


def direction_stages(direction: str, cfg: JobConfig, kb_uri: str, kb_manifest: dict, storage_options: dict | None,
                     entries=None) -> list[Stage]:
    """The stages that complete rows of ``direction`` (i2t or t2i), in order, with this direction's settings.

    ``entries``: the KB's entries table when it is already in this process (else the stages read ``kb_uri``).
    """
    from rag4dmc.actors.encoders import encoder_image_size

    observed = "image" if direction == TASK_I2T else "text"
    encoder = EncoderConfig.model_validate(kb_manifest["config"]["encoder"])
    retrieval, selection, settings = effective_settings(cfg.retrieval, cfg.selection,
                                                        kb_manifest.get("calibration"), direction)
    groups = shard_groups(len(kb_manifest["shards"]), cfg.shards_per_actor)
    if direction == TASK_I2T:
        prepare: Stage = FetchAndDecode(encoder_image_size(encoder), encoder.max_image_pixels, storage_options)
    else:
        prepare = CheckTexts()
    stages: list[Stage] = [prepare, EmbedQueries(encoder, observed)]
    stages += [RetrieveNeighbours(kb_uri, storage_options, group, observed, retrieval, role_of(g, len(groups)),
                                  kb_manifest["image_dim"], kb_manifest["text_dim"]) for g, group in enumerate(groups)]
    complete = CompleteTexts if direction == TASK_I2T else CompleteImages
    stages.append(complete(cfg.generator, selection, encoder, entries if entries is not None else kb_uri,
                           storage_options, settings=settings, example_cache_mb=cfg.storage.example_cache_mb,
                           confidence=confidence_model(kb_manifest.get("calibration"), direction),
                           min_confidence=cfg.min_confidence))
    policy = StagePolicy(cfg.batch_timeout_s, cfg.transient_retries, cfg.retry_backoff_s)
    for stage in stages:
        stage.policy = policy
    return stages


def check_stages(stages: list[Stage]) -> None:
    """The plan-time contract check: every stage's inputs come from the input rows or an earlier stage."""
    check_chain(stages, source=INPUT_SCHEMA.names)


def pool_name(stage: Stage, direction: str, position: int) -> str:
    """``<stage>:<direction>[:<shard group>]``, the key of an actor pool in logs and in ``plan_resources``."""
    if isinstance(stage, RetrieveNeighbours):
        return f"{stage.name}:{direction}:{position}"
    return f"{stage.name}:{direction}"


def chain_pools(direction: str, stages: list[Stage]) -> list[tuple[str | None, Stage]]:
    """Each stage of a direction's chain with the name of its actor pool (None: it runs as CPU tasks); retrieval
    stages are numbered by shard group. The one place pools are named."""
    named, groups = [], 0
    for stage in stages:
        if not stage.ACTOR:
            named.append((None, stage))
            continue
        position = groups if isinstance(stage, RetrieveNeighbours) else 0
        groups += isinstance(stage, RetrieveNeighbours)
        named.append((pool_name(stage, direction, position), stage))
    return named


def stage_override(cfg: JobConfig, pool: str) -> StageResources | None:
    """The config's ``resources`` for ``pool`` (``generate:t2i``), field by field over its stage's
    (``generate``): a direction's pool can carry its own measured ``seconds_per_row``."""
    stage, own = cfg.resources.get(pool.split(":")[0]), cfg.resources.get(pool)
    if own is None or stage is None:
        return own or stage
    return stage.model_copy(update=own.model_dump(exclude_none=True))


def actor_pools(cfg: JobConfig, chains: dict[str, list[Stage]], has_gpu: bool,
                shares: dict[str, float] | None = None) -> dict[str, Pool]:
    """Each actor pool of the plan: the stage's declaration with the config's override, and the share of the rows
    to complete that its direction holds (``shares``, by direction; half each by default)."""
    pools: dict[str, Pool] = {}
    for direction, stages in chains.items():
        for name, stage in chain_pools(direction, stages):
            if name is None:
                continue
            override = stage_override(cfg, name)
            declared = stage.RESOURCES.with_overrides(override).for_gpu(has_gpu)
            pools[name] = Pool(
                declared, (shares or {}).get(direction, 1.0 / len(chains)),
                fixed=override is not None and override.max_actors is not None)
    return pools


def task_cpus(cfg: JobConfig, n_chains: int, cluster_cpus: float) -> float:
    """CPUs the job's tasks (a read per branch at a time, the task slots) keep for themselves."""
    tasks = (n_chains + 1) * read_concurrency(cfg, cluster_cpus) + task_slots(n_chains)
    return tasks * CPU_TASK.num_cpus


def plan_resources(cfg: JobConfig, chains: dict[str, list[Stage]], has_gpu: bool, capacity: Capacity,
                   shares: dict[str, float] | None = None) -> dict[str, Resources]:
    """Each actor pool's resources: the stage's declaration, the config's override, sized from the cluster
    (``rag4dmc.pipeline.job.scaling.size_pools``) and fitted to its CPUs now.

    The CPUs left for the pools are the cluster's less the tasks' share (a read and a map task at a time per
    branch); without that room a small machine waits forever.
    """
    pools = actor_pools(cfg, chains, has_gpu, shares)
    largest = capacity.memory_gb_now / max(capacity.nodes_now, 1)
    for name, pool in pools.items():
        if not capacity.autoscaling and pool.resources.memory_gb > capacity.memory_gb_now:
            log.warning("pool %s asks for %.1f GiB per actor but the cluster has %.1f GiB (about %.1f GiB a node); "
                        "it starts only once a larger node joins (set resources.%s.memory_gb to what the model needs)",
                        name, pool.resources.memory_gb, capacity.memory_gb_now, largest, name.split(":")[0])
    reserved = task_cpus(cfg, len(chains), capacity.cpus_now)
    sized = size_pools(pools, capacity, reserved)
    return dict(zip(sized, fit_to_cpus(list(sized.values()), capacity.cpus_now - reserved)))


def _committed(storage_cfg: StorageConfig, out: str, shard: str) -> set[str]:
    from rag4dmc.pipeline.io.storage import Storage

    return committed_keys(Storage(storage_cfg), out, shard)


@dataclass
class Plan:
    """The job's dataset, the actor counting its rows in flight (``rag4dmc.pipeline.job.in_flight``) and that limit in rows, the
    actor pools' resources and the run's usage log (``rag4dmc.pipeline.job.pool_usage``); the counter and the log are
    one actor (``rag4dmc.pipeline.job.run_state``)."""

    dataset: object
    flow: object
    limit_rows: int
    pools: dict[str, Resources] = field(default_factory=dict)
    usage: object = None


def partial_rows(cfg: JobConfig, pools: dict[str, Resources], n_chains: int) -> list[int]:
    """The most rows each operator can hold back waiting for more (see ``rag4dmc.pipeline.job.in_flight``): a batch per actor
    pool; a block per branch's split after its read and, where a pool takes tasks smaller than a block
    (:func:`rag4dmc.pipeline.job.scaling.task_rows`), a block per direction's merge before commit. CPU tasks take whole
    blocks (no wait)."""
    merges = n_chains if any(task_rows(r, cfg.block_rows, cfg.task_seconds) < cfg.block_rows
                             for r in pools.values()) else 0
    return [r.effective_batch_size() for r in pools.values()] + [cfg.block_rows] * (n_chains + 1 + merges)


def flow_floor(cfg: JobConfig, pools: dict[str, Resources], n_chains: int) -> int:
    """Rows in flight below which a read is always let in: what the operators can hold back at once."""
    return sum(partial_rows(cfg, pools, n_chains))


def flow_limit(cfg: JobConfig, chains: dict[str, list[Stage]], pools: dict[str, Resources]) -> int:
    """Rows the plan may hold between read and commit: ``max_blocks_in_flight`` blocks, checked against the
    plan's batch sizes, or by default twice what its pools hold at once."""
    batches = partial_rows(cfg, pools, len(chains))
    blocks = cfg.max_blocks_in_flight
    if blocks is None:
        blocks = flow.default_blocks([r.max_actors * r.effective_batch_size() for r in pools.values()], batches,
                                     cfg.block_rows)
    flow.check_limit(blocks, cfg.block_rows, batches)
    return blocks * cfg.block_rows


def describe_pools(pools: dict[str, Resources], cfg: JobConfig) -> list[str]:
    """One line per pool: its size bounds, what each actor takes and the rows of a task where it is not a block."""
    lines = []
    for name, r in pools.items():
        gpu = f", {r.num_gpus:g} GPU" if r.num_gpus else ""
        rows = task_rows(r, cfg.block_rows, cfg.task_seconds)
        tasks = f", tasks of {rows} rows" if rows < cfg.block_rows else ""
        lines.append(f"{name}: {r.min_actors}..{r.max_actors} actors (starting at {r.initial_actors or r.min_actors}), "
                     f"{r.num_cpus:g} CPU{gpu}, {r.memory_gb:g} GiB, batch {r.effective_batch_size()} each{tasks}")
    return lines


def build_plan(cfg: JobConfig, data: str, kb_uri: str, kb_manifest: dict, out: str, storage, has_gpu: bool,
               capacity: Capacity, data_format: str = "auto", shards: list[str] | None = None, keys: set[str] | None = None,
               shares: dict[str, float] | None = None) -> Plan:
    """The Ray Data dataset that completes ``data`` (only ``shards`` / ``keys`` if given), rows already
    committed under ``out`` skipped, with the actor that bounds its rows in flight. ``shares``: each direction's
    share of the rows to complete (``rag4dmc.pipeline.job.census``), which sizes its pools with ``capacity``
    (``rag4dmc.pipeline.job.scaling.read_capacity``)."""
    import ray

    chains = {d: direction_stages(d, cfg, kb_uri, kb_manifest, storage.options) for d, _ in DIRECTIONS}
    for stages in chains.values():
        check_stages(stages)
    pools = plan_resources(cfg, chains, has_gpu, capacity, shares)
    log.info("cluster: %s", capacity.describe())
    for line in describe_pools(pools, cfg):
        log.info("pool %s", line)
    reads = read_concurrency(cfg, capacity.cpus_now)
    limit = flow_limit(cfg, chains, pools)
    # one actor for the run's rows-in-flight counter and its pools' usage log
    counter = usage = run_state.start(limit, flow_floor(cfg, pools, len(chains)))
    log.info("at most %d rows in flight (read, not yet committed)", limit)

    # Ray Data's per-operator reservations split the CPUs over the plan's ~20 operators; on a small cluster every
    # share is below one CPU task's request, and the commit (and the splits) never get scheduled: a stall, seen
    # at N = 5,000 on 2 CPUs. The rows-in-flight limit and the pools' sizes bound what runs at once instead.
    # Set before the datasets are made: each one keeps the DataContext it was created under.
    ray.data.DataContext.get_current().op_resource_reservation_enabled = False
    committed = functools.partial(_committed, cfg.storage, out) if keys is None else None
    # CPU tasks take whole blocks (no batch to wait for): a block is decoded and finalized as soon as it arrives.
    cpu = {"num_cpus": CPU_TASK.num_cpus, "batch_size": None, "batch_format": "numpy", **faults.remote_args()}
    fin = {"fn_kwargs": {"kb_version": kb_manifest["version"], "config_hash": cfg.config_hash()}, **cpu}

    def read(directions: tuple[str, ...], name: str):
        source = ShardDatasource(data, cfg.columns, storage.options, data_format, shards=shards, keys=keys,
                                 tasks=directions, block_rows=cfg.block_rows, committed=committed, name=name,
                                 flow=counter)
        # Ray Data hands on a read task's rows as one block when the task ends: split it into blocks of
        # block_rows (streaming, no shuffle), the unit that flows through the pools and is committed, so the
        # first rows of a large shard reach the output while the rest are still being completed.
        ds = ray.data.read_datasource(source, num_cpus=CPU_TASK.num_cpus, concurrency=reads,
                                      override_num_blocks=max(1, len(source.shards)))
        return ds.repartition(target_num_rows_per_block=cfg.block_rows)

    branches = []
    for direction, _ in DIRECTIONS:
        ds = read((direction,), f"Read{direction.upper()}")
        split = False
        for name, stage in chain_pools(direction, chains[direction]):
            if name is None:
                ds = ds.map_batches(run_stage, fn_kwargs={"stage": stage}, **cpu)
                continue
            rows = task_rows(pools[name], cfg.block_rows, cfg.task_seconds)
            if rows < cfg.block_rows:  # long work per row: tasks smaller than a block, merged again before commit
                ds = ds.repartition(target_num_rows_per_block=rows)
                split = True
            ds = ds.map_batches(actor_class(stage), fn_constructor_kwargs={"stage": stage, "pool": name, "usage": usage},
                                batch_format="numpy", **pools[name].map_batches_kwargs(cfg.actor_restarts),
                                **faults.remote_args())
        if split:
            ds = ds.repartition(target_num_rows_per_block=cfg.block_rows)
        branches.append(ds.map_batches(finalize, **fin))
    branches.append(read(PASS_TASKS, "ReadComplete").map_batches(finalize, **fin))
    return Plan(branches[0].union(*branches[1:]), counter, limit, pools, usage)


def write(plan: Plan, out: str, storage_cfg: StorageConfig, output_format: str = "parquet") -> tuple[dict, dict]:
    """Run the plan, committing each output block as it arrives (``rag4dmc.pipeline.job.writer.OutputSink``) as a file of
    ``output_format`` (``JobConfig.output_format``); returns the rows-in-flight figures
    (``rag4dmc.pipeline.job.in_flight.InFlight.stats``) and how the run used the cluster (:func:`cluster_usage`)."""
    import ray

    started = time.time()
    try:
        plan.dataset.write_datasink(OutputSink(out, storage_cfg, plan.flow, output_format),
                                    ray_remote_args={"num_cpus": CPU_TASK.num_cpus, **faults.remote_args()})
        return ray.get(plan.flow.stats.remote()), cluster_usage(plan, started)
    finally:
        ray.kill(plan.flow)
        if plan.usage is not None and plan.usage is not plan.flow:
            ray.kill(plan.usage)


def cluster_usage(plan: Plan, started: float) -> dict:
    """Per pool: its planned bounds and what it used (``rag4dmc.pipeline.job.pool_usage.pool_usage``), and the pool that bounded
    throughput (the busiest), which is logged."""
    import ray

    used = pool_usage(ray.get(plan.usage.reports_now.remote()), started) if plan.usage is not None else {}
    pools = {}
    for name, r in plan.pools.items():
        pools[name] = {"min_actors": r.min_actors, "max_actors": r.max_actors, "num_gpus": r.num_gpus,
                       "num_cpus": r.num_cpus, "declared_seconds_per_row": r.seconds_per_row,
                       **used.get(name, {"peak_actors": 0, "busy_share": None})}
    for name, p in pools.items():
        if p.get("seconds_per_row"):
            log.info("pool %s: %.4g s per row measured, %.4g declared (set resources.%s.seconds_per_row to size the "
                     "next run from the measurement)", name, p["seconds_per_row"], p["declared_seconds_per_row"], name)
    bound = bounding_pool(pools)
    if bound:
        log.info("throughput was bounded by %s: its actors were busy %.0f%% of the time they were alive "
                 "(peak %d actors)", bound, 100 * pools[bound]["busy_share"], pools[bound]["peak_actors"])
    return {"pools": pools, "bounded_by": bound}
