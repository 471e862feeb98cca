"""What each actor class needs from a Ray cluster, declared beside the class.

Every actor class carries a ``RESOURCES`` attribute of type :class:`Resources`. The Ray Data job and
the Serve app size their pools from it (optionally overridden per stage by
``rag4dmc.pipeline.config.StageResources``), so the numbers live in one place.

CPU-only defaults are fractional on purpose: on a 2-CPU machine a pool that takes every CPU starves
Ray Data's read tasks and the job never finishes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from rag4dmc.pipeline import blas


@dataclass(frozen=True)
class Resources:
    """One actor's (or task's) request, its pool's size bounds and its declared cost.

    ``max_actors=None`` (the default) means "as many as the cluster holds or can get": the job and Serve size
    the pool from the cluster and from each pool's share of the work (``rag4dmc.pipeline.job.scaling``). ``seconds_per_row``
    is what one actor spends per row on its device (the GPU when ``num_gpus`` > 0, else its CPUs), as measured
    or published (docs/scaling.md): it sets each pool's share of the cluster and the dry run's estimates.
    """

    num_cpus: float = 0.5
    num_gpus: float = 0.0
    memory_gb: float = 1.0
    min_actors: int = 1
    max_actors: int | None = None
    initial_actors: int | None = None  # actors started at once (None: min_actors); Ray Data grows or shrinks it
    batch_size: int = 64
    gpu_batch_size: int | None = None
    seconds_per_row: float = 0.001

    def __post_init__(self) -> None:
        if self.num_cpus <= 0 or self.num_gpus < 0 or self.memory_gb <= 0 or self.seconds_per_row <= 0:
            raise ValueError(f"resources must be positive: {self}")
        if self.min_actors < 1 or (self.max_actors is not None and self.max_actors < self.min_actors):
            raise ValueError(f"need 1 <= min_actors <= max_actors, got {self.min_actors}..{self.max_actors}")
        if self.initial_actors is not None and not (
                self.min_actors <= self.initial_actors <= (self.max_actors or self.initial_actors)):
            raise ValueError(f"initial_actors {self.initial_actors} is outside {self.min_actors}..{self.max_actors}")

    @property
    def sized(self) -> bool:
        """Whether the pool's largest size is known (set, or fixed by :func:`rag4dmc.pipeline.job.scaling.size_pools`)."""
        return self.max_actors is not None

    def with_overrides(self, override: Any | None) -> Resources:
        """Apply a ``StageResources`` (or any object with the same optional fields)."""
        if override is None:
            return self
        fields = ("num_cpus", "num_gpus", "memory_gb", "min_actors", "max_actors", "batch_size", "seconds_per_row")
        changes = {f: getattr(override, f) for f in fields if getattr(override, f, None) is not None}
        merged = replace(self, **changes, initial_actors=None)
        if merged.max_actors is not None and merged.min_actors > merged.max_actors:
            merged = replace(merged, max_actors=merged.min_actors)
        return merged

    def for_gpu(self, has_gpu: bool) -> Resources:
        """Drop the GPU request on a CPU-only cluster (the actor then runs on CPU)."""
        if has_gpu or self.num_gpus == 0:
            return self
        return replace(self, num_gpus=0.0)

    def effective_batch_size(self) -> int:
        return self.gpu_batch_size if (self.num_gpus > 0 and self.gpu_batch_size) else self.batch_size

    def map_batches_kwargs(self, restarts: int = -1) -> dict[str, Any]:
        """Keyword arguments for ``Dataset.map_batches`` with a callable class. An actor whose process dies is
        restarted up to ``restarts`` times (``JobConfig.actor_restarts``) and its batch retried on the new one.
        -1 (always) is Ray Data's own default, so only another value is passed on."""
        from ray.data import ActorPoolStrategy

        if self.max_actors is None:
            raise ValueError("size the pool from the cluster first (rag4dmc.pipeline.job.scaling.size_pools)")
        kwargs: dict[str, Any] = {
            "num_cpus": self.num_cpus,
            "compute": ActorPoolStrategy(min_size=self.min_actors, max_size=self.max_actors,
                                         initial_size=self.initial_actors or self.min_actors),
            "batch_size": self.effective_batch_size(),
            "memory": int(self.memory_gb * 1024**3),
        }
        if restarts != -1:
            kwargs.update(max_restarts=restarts, max_task_retries=-1 if restarts else 0)
        if self.num_gpus:
            kwargs["num_gpus"] = self.num_gpus
        return kwargs

    def serve_options(self) -> dict[str, Any]:
        """``ray_actor_options`` for a Serve deployment."""
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "memory": int(self.memory_gb * 1024**3)}
        if self.num_gpus:
            opts["num_gpus"] = self.num_gpus
        return opts


def use_gpus(accelerators: str) -> bool:
    """Whether pools request GPUs: ``gpu`` always (autoscaling GPU workers may start at zero), ``cpu`` never,
    ``auto`` when the cluster has GPUs now. The job, the KB build and Serve all decide with this."""
    if accelerators == "auto":
        import ray

        return ray.cluster_resources().get("GPU", 0) > 0
    return accelerators == "gpu"


def fit_to_cpus(pools: Sequence[Resources], budget: float) -> list[Resources]:
    """The pools with their CPU requests scaled down (never up) so that every pool's minimum size fits.

    Ray starts each pool's ``min_actors`` before any work flows; if their CPUs add up to more than the
    cluster has left after the tasks' share, the job waits forever. Requests are logical, so a smaller
    share costs no correctness: the actors still run, they just stop reserving CPUs nobody else can use.
    """
    if budget <= 0:
        raise ValueError(f"no CPUs left for the actor pools (budget {budget:.3f}); give the cluster more CPUs "
                         "or lower the task reservation")
    need = sum(p.num_cpus * p.min_actors for p in pools)
    if need <= budget:
        return list(pools)
    scale = budget / need
    return [replace(p, num_cpus=p.num_cpus * scale) for p in pools]


def use_assigned_cpus() -> int:
    """Set torch's, FAISS's and the BLAS libraries' threads to the CPUs Ray assigned to this task or actor.

    Ray starts its workers with one thread per library (``OMP_NUM_THREADS=1``), whatever the task reserved: a
    task that reserves 8 CPUs still multiplies matrices on one core unless it says otherwise. Returns the count,
    or 0 (and changes nothing) where no CPUs are assigned: outside Ray, or on the driver."""
    import ray

    if not ray.is_initialized():
        return 0
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    if not cpus:
        return 0
    import faiss
    import torch
    from threadpoolctl import ThreadpoolController

    n = max(1, int(cpus))
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    controller = ThreadpoolController()  # inspects the loaded libraries once, for the limit and the warning
    controller.limit(limits=n)
    blas.warn_if_generic(controller.info())
    return n

