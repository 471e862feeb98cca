"""How large each actor pool may grow: the cluster's capacity, now and what its autoscaler may add, shared out
by each pool's cost per row (after Cosmos-Xenna's throughput-balanced stages).

Ray Data autoscales every actor pool between its ``min_size`` and ``max_size`` on the pool's utilisation. What
it lacks is the ``max_size``: its docs tell users to set it to their GPU count by hand, and a pool allowed every
GPU can hold GPUs that the slowest stage needs (ray-project/ray#66196). :func:`size_pools` gives each pool the
largest size it can use: actors go, one at a time, to the pool whose rows take longest per actor
(``seconds_per_row`` x the pool's share of the rows / its actors' device share), until that pool no longer fits
the cluster. The slowest stage ends up with the most actors, and no cheaper stage is allowed more than it needs to
keep up with it. A setting in ``resources.<stage>`` (``max_actors``) always wins.

:func:`read_capacity` reads the cluster: the nodes alive now, plus the nodes its autoscaler may add (the
autoscaler's cluster config, where Ray publishes one), so GPU workers that start at zero count.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace

from actors.resources import Resources

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


def read_capacity() -> Capacity:
    """The connected Ray cluster's :class:`Capacity`; the autoscaler's node groups count with the nodes of each
    group it may still add (its ``max_count`` less the group's nodes alive now)."""
    import ray

    alive = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    groups = []
    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception as exc:  # noqa: BLE001 - no autoscaler config: the cluster is what is alive
        log.debug("no autoscaler config (%s); sizing from the nodes alive", exc)
        config = None
    for group in getattr(config, "node_group_configs", None) or []:
        shape = dict(group.resources)
        if not shape or group.max_count == 0:
            continue
        present = sum(1 for n in alive if _same_shape(n, shape))
        if group.max_count < 0:  # no limit stated: size from what is there, or pools would ask for every node
            log.warning("the autoscaler may add nodes of group %r without limit; sizing pools from the %d such "
                        "nodes alive (set the group's max_workers, or resources.<stage>.max_actors)",
                        getattr(group, "name", "?"), present)
            continue
        groups.append((shape, max(0, group.max_count - present)))
    capacity = capacity_of(alive, groups)
    limits = dict(getattr(config, "max_resources", None) or {})  # the cluster's own cap on its totals, if any
    if limits:
        capacity = replace(capacity, cpus=min(capacity.cpus, limits.get("CPU", capacity.cpus)),
                           gpus=min(capacity.gpus, limits.get("GPU", capacity.gpus)))
    return capacity


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
