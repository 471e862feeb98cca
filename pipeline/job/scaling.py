"""How large each actor pool may grow: the cluster's capacity, now and what its autoscaler may add, shared out
by each pool's cost per row (after Cosmos-Xenna's throughput-balanced stages).

Ray Data autoscales every actor pool between its ``min_size`` and ``max_size`` on the pool's utilisation. What
it lacks is the ``max_size``: its docs tell users to set it to their GPU count by hand, and a pool allowed every
GPU can hold GPUs that the slowest stage needs (ray-project/ray#66196). :func:`size_pools` gives each pool the
largest size it can use: actors go, one at a time, to the pool whose rows take longest per actor
(``seconds_per_row`` x the pool's share of the rows / its actors' device share), until that pool no longer fits
the cluster. The slowest stage ends up with the most actors, and no cheaper stage is allowed more than it needs to
keep up with it. A setting in ``resources.<stage>`` (``max_actors``) always wins.

:func:`read_capacity` reads the cluster: the nodes alive now, plus the nodes its autoscaler may add, so GPU workers
that start at zero count. Those come from the cluster config Ray publishes in the GCS where a control plane reports
one (KubeRay, Anyscale), else from the autoscaler's own config file on this node: the ``--autoscaling-config`` its
monitor process was started with (``ray up``, ``AutoscalingCluster``), or ``ray up``'s bootstrap config. Open-source
Ray 2.60 publishes no cluster config for ``ray up`` clusters, so without the file the job would see only the head.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace

from rag4dmc.actors.resources import Resources

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Capacity:
    """What the cluster has now (``*_now``) and at most, once its autoscaler has added every node it may."""

    cpus: float
    gpus: float
    memory_gb: float
    nodes: int
    cpus_now: float
    gpus_now: float
    memory_gb_now: float
    nodes_now: int

    @property
    def autoscaling(self) -> bool:
        return self.nodes > self.nodes_now

    def describe(self) -> str:
        now = f"{self.nodes_now} nodes, {self.cpus_now:g} CPUs, {self.gpus_now:g} GPUs, {self.memory_gb_now:.0f} GiB"
        if not self.autoscaling:
            return now
        return f"{now} now; up to {self.nodes} nodes, {self.cpus:g} CPUs, {self.gpus:g} GPUs with the autoscaler"


def capacity_of(alive: list[Mapping[str, float]], groups: list[tuple[Mapping[str, float], int]] = ()) -> Capacity:
    """The :class:`Capacity` of nodes ``alive`` (Ray resource dicts, ``memory`` in bytes) plus the autoscaler's
    node groups (resources per node, nodes it may still add)."""
    def total(nodes, key):
        return sum(float(n.get(key, 0.0)) * k for n, k in nodes)

    now = [(n, 1) for n in alive]
    more = [(n, k) for n, k in groups if k > 0]
    gib = 1024**3
    return Capacity(
        cpus=total(now + more, "CPU"), gpus=total(now + more, "GPU"), memory_gb=total(now + more, "memory") / gib,
        nodes=len(alive) + sum(k for _, k in more), cpus_now=total(now, "CPU"), gpus_now=total(now, "GPU"),
        memory_gb_now=total(now, "memory") / gib, nodes_now=len(alive))


@dataclass(frozen=True)
class NodeGroup:
    """A node type the autoscaler may start: its resources per node (Ray's keys, ``memory`` in bytes) and the most
    nodes of it (-1: no limit stated)."""

    name: str
    resources: Mapping[str, float]
    max_count: int


def read_capacity() -> Capacity:
    """The connected Ray cluster's :class:`Capacity`; the autoscaler's node groups count with the nodes of each
    group it may still add (its ``max_count`` less the group's nodes alive now)."""
    import ray

    alive = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    groups, limits = published_groups()
    if not groups:
        groups, worker_limit = config_file_groups()
    else:
        worker_limit = None
    added = []
    for group in groups:
        shape = dict(group.resources)
        if not shape or group.max_count == 0:
            continue
        present = sum(1 for n in alive if _same_shape(n, shape) and HEAD_RESOURCE not in n)
        if group.max_count < 0:  # no limit stated: size from what is there, or pools would ask for every node
            log.warning("the autoscaler may add nodes of group %r without limit; sizing pools from the %d such "
                        "nodes alive (set the group's max_workers, or resources.<stage>.max_actors)",
                        group.name, present)
            continue
        added.append((shape, max(0, group.max_count - present)))
    if worker_limit is not None:  # the config's max_workers caps the workers of all types together
        added = cap_workers(added, worker_limit - (len(alive) - 1))
    capacity = capacity_of(alive, added)
    if limits:  # the cluster's own cap on its totals, if any
        capacity = replace(capacity, cpus=min(capacity.cpus, limits.get("CPU", capacity.cpus)),
                           gpus=min(capacity.gpus, limits.get("GPU", capacity.gpus)))
    return capacity


def published_groups() -> tuple[list[NodeGroup], dict[str, float]]:
    """The node groups and resource caps of the cluster config in the GCS (``([], {})`` where none is published)."""
    import ray

    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception as exc:  # noqa: BLE001 - no published config: the caller tries the config file
        log.debug("no cluster config in the GCS (%s)", exc)
        return [], {}
    groups = [NodeGroup(getattr(g, "name", "?"), dict(g.resources), int(g.max_count))
              for g in getattr(config, "node_group_configs", None) or []]
    return groups, dict(getattr(config, "max_resources", None) or {})


BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` leaves the autoscaler's config on the head
AUTOSCALING_CONFIG_FLAG = "--autoscaling-config"


def autoscaling_config_path(gcs_address: str | None = None, proc: str = "/proc") -> str | None:
    """The autoscaler's config file of the cluster at ``gcs_address``, as this node sees it: the
    ``--autoscaling-config`` of its monitor process (which names the cluster's ``--gcs-address``) or of
    ``ray start --head``, else ``ray up``'s bootstrap config; None when neither is here (a driver off the head)."""
    found = None
    for pid in (p for p in os.listdir(proc) if p.isdigit()):
        try:
            with open(f"{proc}/{pid}/cmdline", "rb") as f:
                args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        path = _flag(args, AUTOSCALING_CONFIG_FLAG)
        if path is None:
            continue
        gcs = _flag(args, "--gcs-address") or _flag(args, "--address")
        if gcs_address is None or gcs is None or gcs == gcs_address:
            found = os.path.expanduser(path)
            if gcs == gcs_address:  # the monitor of this very cluster
                break
    if found is None and os.path.exists(os.path.expanduser(BOOTSTRAP_CONFIG)):
        found = os.path.expanduser(BOOTSTRAP_CONFIG)
    return found


def _flag(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
        if a == name and i + 1 < len(args):
            return args[i + 1]
    return None


def groups_of_config(config: Mapping) -> tuple[list[NodeGroup], int | None]:
    """The worker node types of an autoscaler config (``available_node_types``: ``resources``, ``max_workers``)
    and its cluster-wide ``max_workers``. A type whose ``resources`` are empty (filled by the cloud provider at
    launch) is skipped with a warning: its GPUs cannot be known here."""
    groups = []
    head = config.get("head_node_type")
    for name, node in (config.get("available_node_types") or {}).items():
        limit = int(node.get("max_workers", 0) or 0)
        if name == head or limit == 0:
            continue
        resources = {k: float(v) for k, v in (node.get("resources") or {}).items()}
        if not resources:
            log.warning("the autoscaler's node type %r states no resources; its nodes count only once they join "
                        "(write resources: {CPU: .., GPU: .., memory: ..} for it in the cluster config)", name)
            continue
        groups.append(NodeGroup(name, resources, limit))
    limit = config.get("max_workers")
    return groups, (int(limit) if limit is not None else None)


def config_file_groups() -> tuple[list[NodeGroup], int | None]:
    """:func:`groups_of_config` of the autoscaler's config file on this node (``([], None)`` when there is none)."""
    import ray
    import yaml

    try:
        gcs = ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - not connected: any monitor on this node
        gcs = None
    path = autoscaling_config_path(gcs)
    if path is None:
        return [], None
    try:
        with open(path) as f:
            config = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as exc:
        log.warning("could not read the autoscaler's config %s (%s); sizing pools from the nodes alive", path, exc)
        return [], None
    log.info("the autoscaler's node types, from %s", path)
    return groups_of_config(config)


def cap_workers(added: list[tuple[Mapping[str, float], int]], room: int) -> list[tuple[Mapping[str, float], int]]:
    """The nodes each group may add, within ``room`` worker nodes in all: GPU groups keep theirs first (the job's
    bound is its GPU work), then the rest in order."""
    order = sorted(range(len(added)), key=lambda i: -float(added[i][0].get("GPU", 0)))
    left, out = max(0, room), list(added)
    for i in order:
        shape, k = added[i]
        out[i] = (shape, min(k, left))
        left -= out[i][1]
    return out


HEAD_RESOURCE = "node:__internal_head__"  # in the head node's resources: the head is never a worker of a group


def _same_shape(node: Mapping[str, float], shape: Mapping[str, float]) -> bool:
    return all(abs(float(node.get(k, 0.0)) - float(v)) < 1e-6 for k, v in shape.items() if k in ("CPU", "GPU"))


def device(r: Resources) -> str:
    """The resource a pool is bounded by: ``GPU`` when its actors ask for one, else ``CPU``."""
    return "GPU" if r.num_gpus > 0 else "CPU"


def device_share(r: Resources) -> float:
    """How many rows at a time one actor works on, relative to its declared ``seconds_per_row``: its CPUs (at least
    one: an actor runs at least one thread, whatever fraction of a CPU it reserves), or one for a GPU actor. A
    fraction of a GPU is what the actor holds of the card's memory; its compute is the whole card's whenever the
    actor beside it (a CLIP embedder) is idle, so it counts as one."""
    return 1.0 if r.num_gpus > 0 else max(1.0, r.num_cpus)


def seconds_per_row(r: Resources, row_share: float) -> float:
    """Device-seconds the pool spends per input row of the job: its own cost times the share of rows it sees."""
    return r.seconds_per_row * row_share


def stage_time(r: Resources, row_share: float, actors: int) -> float:
    """Seconds per input row of the job that a pool of ``actors`` needs: the smaller, the faster it keeps up."""
    return seconds_per_row(r, row_share) / (max(actors, 1) * device_share(r))


def task_rows(r: Resources, block_rows: int, task_seconds: float) -> int:
    """Rows one task of a pool takes: a whole block, or, where that would hold one actor longer than
    ``task_seconds`` by the declared cost, the whole batches that fit in that time (at least one batch).

    Ray Data hands a task's rows to one actor, so a 256-row SDXL block (about 9 minutes) lets only as many
    actors work as there are blocks waiting, and leaves a long tail; tasks of ``task_seconds`` let every actor
    of the pool share each block."""
    batch = r.effective_batch_size()
    fits = int(task_seconds / r.seconds_per_row)
    if fits >= block_rows:
        return block_rows
    return min(block_rows, max(batch, fits // batch * batch))


@dataclass(frozen=True)
class Pool:
    """A pool to size: its resources (declared, with the user's overrides) and the share of the job's rows it
    handles. ``fixed``: the user set ``max_actors``, so it is left as it is."""

    resources: Resources
    row_share: float = 1.0
    fixed: bool = False


def size_pools(pools: Mapping[str, Pool], capacity: Capacity, cpu_reserved: float = 0.0) -> dict[str, Resources]:
    """Each pool's resources with ``max_actors`` (and ``initial_actors``) set from the cluster.

    GPU pools are sized first, on the cluster's GPUs (counting the CPUs and memory their actors take), then CPU
    pools on the CPUs left after ``cpu_reserved`` (the job's tasks). Within each kind, every pool starts at its
    ``min_actors``; then one actor at a time goes to the pool with the largest :func:`stage_time`, while it fits.
    When the slowest pool no longer fits, the others are not grown: past that point they would hold devices
    the job cannot use. A pool never gets fewer than ``min_actors``; a fixed pool keeps its own bounds.
    """
    budget = Budget(capacity, cpu_reserved)
    sizes: dict[str, int] = {}
    for name, pool in pools.items():
        r = pool.resources
        sizes[name] = r.max_actors if pool.fixed and r.max_actors else r.min_actors
        for _ in range(sizes[name]):
            budget.take(r)
    for kind in ("GPU", "CPU"):
        growing = [n for n, p in pools.items() if device(p.resources) == kind and not p.fixed]
        while growing:
            slowest = max(growing, key=lambda n: stage_time(pools[n].resources, pools[n].row_share, sizes[n]))
            r = pools[slowest].resources
            if not budget.fits(r):
                break
            budget.take(r)
            sizes[slowest] += 1
    out = {}
    for name, pool in pools.items():
        r = pool.resources
        cap = max(sizes[name], r.min_actors)
        initial = r.min_actors if device(r) == "CPU" else cap  # GPU pools start whole: the autoscaler sees it all
        out[name] = r if pool.fixed else replace(r, max_actors=cap, initial_actors=initial)
    return out


class Budget:
    """What is left of the cluster while actors are handed out: CPUs and memory as totals, GPUs one by one.

    Ray places a fractional GPU request on a single GPU, so two actors of 0.75 GPU never share one. Whether the
    actors' GPU requests fit is checked by packing them, largest first, each into the fullest GPU that still
    holds it: a CLIP embedder of 0.25 then fills the quarter a generator of 0.75 leaves. A CPU actor counts at
    least one whole CPU (:func:`device_share`)."""

    def __init__(self, capacity: Capacity, cpu_reserved: float = 0.0):
        self.cpus, self.memory_gb = capacity.cpus - cpu_reserved, capacity.memory_gb
        self.gpus = capacity.gpus
        self.requests: list[float] = []  # the GPU requests of the actors counted so far

    def _packs(self, requests: list[float]) -> bool:
        whole = int(self.gpus + 1e-9)
        left = Counter({1.0: whole})
        if self.gpus - whole > 1e-9:
            left[round(self.gpus - whole, 6)] += 1
        for g in sorted(requests, reverse=True):
            if g >= 1:
                need = math.ceil(g - 1e-9)
                if left[1.0] < need:
                    return False
                left[1.0] -= need
                continue
            fitting = [r for r, n in left.items() if n and r + 1e-9 >= g]
            if not fitting:
                return False
            best = min(fitting)
            left[best] -= 1
            left[round(best - g, 6)] += 1
        return True

    def _cpus(self, r: Resources) -> float:
        return r.num_cpus if r.num_gpus > 0 else device_share(r)

    def fits(self, r: Resources) -> bool:
        return (self.cpus + 1e-9 >= self._cpus(r) and self.memory_gb + 1e-9 >= r.memory_gb
                and (r.num_gpus <= 0 or self._packs([*self.requests, r.num_gpus])))

    def take(self, r: Resources) -> None:
        """Count one actor of ``r`` (also one the pools must have where it does not fit)."""
        if r.num_gpus > 0:
            self.requests.append(r.num_gpus)
        self.cpus -= self._cpus(r)
        self.memory_gb -= r.memory_gb


def expected_rate(pools: Mapping[str, Pool], sized: Mapping[str, Resources]) -> float:
    """Input rows per second the sized pools sustain together, from their declared costs: the slowest pool's."""
    times = {n: stage_time(sized[n], p.row_share, sized[n].max_actors or 1) for n, p in pools.items()}
    slowest = max(times.values(), default=0.0)
    return 1.0 / slowest if slowest > 0 else math.inf
