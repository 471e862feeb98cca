"""The completion job's plan: which stages each direction runs, with what resources, as a Ray Data dataset.

Three branches, each reading only its own rows (the datasource routes rows at read time)::

    i2t rows:  read -> fetch + decode (task) -> embed image -> retrieve (shard groups) -> caption -> finalize --+
    t2i rows:  read -> check text (task)     -> embed text  -> retrieve (shard groups) -> paint   -> finalize --+-> commit
    the rest:  read (observed pairs, rows failed at read) --------------------------------------> finalize --+

No row passes through a pool that does not process it: each direction has its own embed / retrieve /
generate pools, sized from its stages' ``RESOURCES``, and complete pairs go straight to the output. The
stages of each branch are checked against each other (``actors.stage.check_chain``) before any actor
starts. ``direction_stages`` is the one definition of a direction's chain: the job runs it on Ray Data,
``actors.stage.run_chain`` runs it in one process (tests, the benchmark's loop).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from actors.complete import CompleteImages, CompleteTexts
from actors.embed import EmbedQueries
from actors.preprocess import CPU_TASK, CheckTexts, FetchAndDecode
from actors.resources import Resources, fit_to_cpus
from actors.retrieve import RetrieveNeighbours, role_of
from actors.stage import Stage, StagePolicy, check_chain, run_stage
from pipeline import flow
from pipeline.calibrate import effective_settings
from pipeline.config import EncoderConfig, JobConfig, StorageConfig
from pipeline.datasource import ShardDatasource
from pipeline.output import OutputSink, committed_keys, finalize
from pipeline.schema import (
    INPUT_SCHEMA,
    TASK_FAILED,
    TASK_I2T,
    TASK_OBSERVED,
    TASK_T2I,
)

log = logging.getLogger(__name__)

DIRECTIONS = ((TASK_I2T, "image"), (TASK_T2I, "text"))  # (task, observed modality)
PASS_TASKS = (TASK_OBSERVED, TASK_FAILED)  # rows that go straight to the output
# CPU tasks besides the reads that must be able to run at any time beside the actor pools: a prepare task per
# direction, a finalize per branch, the commit. Without a CPU for them, reads held back by the rows-in-flight
# limit (pipeline.flow) wait for commits that cannot be scheduled.
def task_slots(n_directions: int) -> int:
    return n_directions + (n_directions + 1) + 1


def read_concurrency(cfg: JobConfig, cluster_cpus: float) -> int:
    """Read tasks at a time per branch: ``read_concurrency``, or one per 16 cluster CPUs (at least one)."""
    return cfg.read_concurrency or max(1, int(cluster_cpus // 16))


def shard_groups(n_shards: int, max_per_actor: int) -> list[list[int]]:
    """Consecutive shard ids per retrieval stage; a small KB is one stage holding every shard."""
    ids = list(range(n_shards))
    return [ids[i : i + max_per_actor] for i in range(0, n_shards, max_per_actor)] or [[]]


def direction_stages(task: str, cfg: JobConfig, kb_uri: str, kb_manifest: dict, storage_options: dict | None,
                     entries=None) -> list[Stage]:
    """The stages that complete rows of ``task`` (i2t or t2i), in order, with this direction's settings.

    ``entries``: the KB's entries table when it is already in this process (else the stages read ``kb_uri``).
    """
    from actors.encoders import encoder_image_size

    observed = "image" if task == TASK_I2T else "text"
    encoder = EncoderConfig.model_validate(kb_manifest["config"]["encoder"])
    retrieval, selection, settings = effective_settings(cfg.retrieval, cfg.selection,
                                                        kb_manifest.get("calibration"), task)
    groups = shard_groups(len(kb_manifest["shards"]), cfg.shards_per_actor)
    if task == TASK_I2T:
        prepare: Stage = FetchAndDecode(encoder_image_size(encoder), encoder.max_image_pixels, storage_options)
    else:
        prepare = CheckTexts()
    stages: list[Stage] = [prepare, EmbedQueries(encoder, observed)]
    stages += [RetrieveNeighbours(kb_uri, storage_options, group, observed, retrieval, role_of(g, len(groups)),
                                  kb_manifest["image_dim"], kb_manifest["text_dim"]) for g, group in enumerate(groups)]
    complete = CompleteTexts if task == TASK_I2T else CompleteImages
    stages.append(complete(cfg.generator, selection, encoder, entries if entries is not None else kb_uri,
                           storage_options, settings=settings, example_cache_mb=cfg.storage.example_cache_mb))
    policy = StagePolicy(cfg.batch_timeout_s, cfg.transient_retries, cfg.retry_backoff_s)
    for stage in stages:
        stage.policy = policy
    return stages


def check_stages(stages: list[Stage]) -> None:
    """The plan-time contract check: every stage's inputs come from the input rows or an earlier stage."""
    check_chain(stages, source=INPUT_SCHEMA.names)


def pool_name(stage: Stage, task: str, position: int) -> str:
    """``<stage>:<direction>[:<shard group>]``, the key of an actor pool in logs and in ``plan_resources``."""
    if isinstance(stage, RetrieveNeighbours):
        return f"{stage.name}:{task}:{position}"
    return f"{stage.name}:{task}"


def plan_resources(cfg: JobConfig, chains: dict[str, list[Stage]], has_gpu: bool, cluster_cpus: float,
                   cluster_memory_gb: float | None = None) -> dict[str, Resources]:
    """Each actor pool's resources: the stage's declaration, the config's override, then fitted to the cluster.

    The CPUs left for the pools are the cluster's less the tasks' share (a read and a map task at a time per
    branch); without that room a small machine waits forever.
    """
    pools: dict[str, Resources] = {}
    for task, stages in chains.items():
        groups = 0
        for stage in stages:
            if not stage.ACTOR:
                continue
            position = groups if isinstance(stage, RetrieveNeighbours) else 0
            groups += isinstance(stage, RetrieveNeighbours)
            declared = stage.RESOURCES.with_overrides(cfg.resources.get(stage.name))
            pools[pool_name(stage, task, position)] = declared.for_gpu(has_gpu)
    for name, r in pools.items():
        if cluster_memory_gb and r.memory_gb > cluster_memory_gb:
            log.warning("pool %s asks for %.1f GiB per actor but the cluster has %.1f GiB now; it starts only once "
                        "a larger node joins (set resources.%s.memory_gb to what the model needs)",
                        name, r.memory_gb, cluster_memory_gb, name.split(":")[0])
    branches = len(chains) + 1
    tasks = branches * read_concurrency(cfg, cluster_cpus) + task_slots(len(chains))
    budget = cluster_cpus - tasks * CPU_TASK.num_cpus
    return dict(zip(pools, fit_to_cpus(list(pools.values()), budget)))


class StageActor:
    """A stage as Ray Data's callable class: ``setup`` once per actor, then :func:`actors.stage.run_stage` per batch."""

    def __init__(self, stage: Stage):
        self.stage = stage
        stage.ensure_setup()

    def __call__(self, batch):
        return run_stage(batch, stage=self.stage)


def actor_class(stage: Stage) -> type[StageActor]:
    """:class:`StageActor` named after the stage, so Ray Data's logs and progress say which pool is which."""
    return type(f"{type(stage).__name__}Actor", (StageActor,), {"__module__": __name__})


def _committed(storage_cfg: StorageConfig, out: str, shard: str) -> set[str]:
    from pipeline.storage import Storage

    return committed_keys(Storage(storage_cfg), out, shard)


@dataclass
class Plan:
    """The job's dataset, the actor counting its rows in flight (``pipeline.flow``) and that limit in rows."""

    dataset: object
    flow: object
    limit_rows: int


def flow_floor(pools: dict[str, Resources], block_rows: int, branches: int) -> int:
    """Rows that can sit in partial batches: one batch per actor pool, one block per branch's split (see
    ``pipeline.flow``)."""
    return sum(r.effective_batch_size() for r in pools.values()) + branches * block_rows


def flow_limit(cfg: JobConfig, chains: dict[str, list[Stage]], pools: dict[str, Resources]) -> int:
    """Rows the plan may hold between read and commit: ``max_blocks_in_flight`` blocks, checked against the
    plan's batch sizes, or by default twice what its pools hold at once."""
    # CPU tasks take whole blocks (no wait); each branch's split may hold a partial block
    batches = [r.effective_batch_size() for r in pools.values()] + [cfg.block_rows] * (len(chains) + 1)
    blocks = cfg.max_blocks_in_flight
    if blocks is None:
        blocks = flow.default_blocks([r.max_actors * r.effective_batch_size() for r in pools.values()], batches,
                                     cfg.block_rows)
    flow.check_limit(blocks, cfg.block_rows, batches)
    return blocks * cfg.block_rows


def build_plan(cfg: JobConfig, data: str, kb_uri: str, kb_manifest: dict, out: str, storage, has_gpu: bool,
               data_format: str = "auto", shards: list[str] | None = None, keys: set[str] | None = None) -> Plan:
    """The Ray Data dataset that completes ``data`` (only ``shards`` / ``keys`` if given), rows already
    committed under ``out`` skipped, with the actor that bounds its rows in flight."""
    import ray

    chains = {task: direction_stages(task, cfg, kb_uri, kb_manifest, storage.options) for task, _ in DIRECTIONS}
    for stages in chains.values():
        check_stages(stages)
    cluster = ray.cluster_resources()
    pools = plan_resources(cfg, chains, has_gpu, cluster.get("CPU", 0.0), cluster.get("memory", 0.0) / 1024**3)
    for name, r in pools.items():
        log.debug("pool %s: %s", name, r)
    reads = read_concurrency(cfg, cluster.get("CPU", 0.0))
    limit = flow_limit(cfg, chains, pools)
    counter = flow.start(limit, flow_floor(pools, cfg.block_rows, len(chains) + 1))
    log.info("at most %d rows in flight (read, not yet committed)", limit)

    # Ray Data's per-operator reservations split the CPUs over the plan's ~20 operators; on a small cluster every
    # share is below one CPU task's request, and the commit (and the splits) never get scheduled: a stall, seen
    # at N = 5,000 on 2 CPUs. The rows-in-flight limit and the pools' sizes bound what runs at once instead.
    # Set before the datasets are made: each one keeps the DataContext it was created under.
    ray.data.DataContext.get_current().op_resource_reservation_enabled = False
    committed = functools.partial(_committed, cfg.storage, out) if keys is None else None
    # CPU tasks take whole blocks (no batch to wait for): a block is decoded and finalized as soon as it arrives.
    cpu = {"num_cpus": CPU_TASK.num_cpus, "batch_size": None, "batch_format": "numpy"}
    fin = {"fn_kwargs": {"kb_version": kb_manifest["version"], "config_hash": cfg.config_hash()}, **cpu}

    def read(tasks: tuple[str, ...], name: str):
        source = ShardDatasource(data, cfg.columns, storage.options, data_format, shards=shards, keys=keys,
                                 tasks=tasks, block_rows=cfg.block_rows, committed=committed, name=name,
                                 flow=counter)
        # Ray Data hands on a read task's rows as one block when the task ends: split it into blocks of
        # block_rows (streaming, no shuffle), the unit that flows through the pools and is committed, so the
        # first rows of a large shard reach the output while the rest are still being completed.
        ds = ray.data.read_datasource(source, num_cpus=CPU_TASK.num_cpus, concurrency=reads,
                                      override_num_blocks=max(1, len(source.shards)))
        return ds.repartition(target_num_rows_per_block=cfg.block_rows)

    branches = []
    for task, _ in DIRECTIONS:
        ds = read((task,), f"Read{task.upper()}")
        groups = 0
        for stage in chains[task]:
            if not stage.ACTOR:
                ds = ds.map_batches(run_stage, fn_kwargs={"stage": stage}, **cpu)
                continue
            position = groups if isinstance(stage, RetrieveNeighbours) else 0
            groups += isinstance(stage, RetrieveNeighbours)
            ds = ds.map_batches(actor_class(stage), fn_constructor_kwargs={"stage": stage}, batch_format="numpy",
                                **pools[pool_name(stage, task, position)].map_batches_kwargs(cfg.actor_restarts))
        branches.append(ds.map_batches(finalize, **fin))
    branches.append(read(PASS_TASKS, "ReadComplete").map_batches(finalize, **fin))
    return Plan(branches[0].union(*branches[1:]), counter, limit)


def write(plan: Plan, out: str, storage_cfg: StorageConfig, output_format: str = "parquet") -> dict:
    """Run the plan, committing each output block as it arrives (``pipeline.output.OutputSink``) as a file of
    ``output_format`` (``JobConfig.output_format``); returns the rows-in-flight figures
    (``pipeline.flow.InFlight.stats``)."""
    import ray

    try:
        plan.dataset.write_datasink(OutputSink(out, storage_cfg, plan.flow, output_format),
                                    ray_remote_args={"num_cpus": CPU_TASK.num_cpus})
        return ray.get(plan.flow.stats.remote())
    finally:
        ray.kill(plan.flow)
