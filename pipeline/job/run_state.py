"""One small actor per run for the run's shared state: the rows-in-flight counter
(:class:`rag4dmc.pipeline.job.in_flight.InFlight`: reads wait for room, commits make room) and the pools' usage log
(:class:`rag4dmc.pipeline.job.pool_usage.UsageLog`: each actor's newest report). Each is cheap; a Ray actor is a
Python process of its own (about a CPU-second to start), so one run starts one for both.
"""

from __future__ import annotations

from rag4dmc.pipeline.job.in_flight import InFlight
from rag4dmc.pipeline.job.pool_usage import Report, UsageLog


class RunState:
    """A Ray actor (no CPU) with the methods of :class:`InFlight` and of :class:`UsageLog`, each run by its own."""

    def __init__(self, limit_rows: int, floor_rows: int = 0):
        self.flow = InFlight(limit_rows, floor_rows)
        self.log = UsageLog()

    async def acquire(self, rows: int) -> None:
        await self.flow.acquire(rows)

    async def release(self, rows: int) -> None:
        await self.flow.release(rows)

    def stats(self) -> dict:
        return self.flow.stats()

    def report(self, report: Report) -> None:
        self.log.report(report)

    def reports_now(self) -> list[Report]:
        return self.log.reports_now()


def start(limit_rows: int, floor_rows: int):
    """A :class:`RunState` actor for one run."""
    import ray

    return ray.remote(num_cpus=0, max_concurrency=1000)(RunState).remote(limit_rows, floor_rows)
