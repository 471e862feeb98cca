"""How the job used the cluster: per actor pool, the actors it held over time, where they ran and how busy they were.

Every actor of the plan carries a :class:`Meter`: it notes when the actor started (before its model loads), the
node it runs on and the seconds it spends on batches, and reports them to the run's :class:`UsageLog` (a Ray actor
with no CPU) every ``HEARTBEAT_S`` and after each batch (waiting for that one to be recorded, about a millisecond,
so the log holds every batch once the run's rows are out). :func:`pool_usage` turns the reports into the
``summary.json`` figures: the peak number of actors, the actors per node, the busy share (actor-seconds on
batches / actor-seconds alive) and the measured cost per row (actor-seconds on batches / rows), the figure a
stage's ``seconds_per_row`` declares. The pool with the highest busy share is the one that bounded throughput.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass

HEARTBEAT_S = 2.0  # an actor that stops reporting (removed by the autoscaler, or dead) is alive until its last report


@dataclass(frozen=True)
class Report:
    """One actor's account: ``started`` and ``seen`` (wall-clock seconds), seconds ``busy`` on batches so far."""

    pool: str
    actor: str
    node: str
    started: float
    seen: float
    busy: float
    batches: int = 0
    rows: int = 0


class UsageLog:
    """A Ray actor keeping the newest :class:`Report` of every actor of the run."""

    def __init__(self):
        self.reports: dict[str, Report] = {}

    def report(self, report: Report) -> None:
        self.reports[report.actor] = report

    def reports_now(self) -> list[Report]:
        return list(self.reports.values())


class Meter:
    """Times one actor's batches and reports them to the run's :class:`UsageLog` (nothing without one)."""

    def __init__(self, pool: str, log=None):
        import ray

        self.pool, self.log = pool, log
        self.started = time.time()
        self.busy, self.batches, self.rows = 0.0, 0, 0
        ctx = ray.get_runtime_context() if ray.is_initialized() else None
        self.node = ctx.get_node_id() if ctx else "local"
        self.actor = ctx.get_actor_id() if ctx and ctx.get_actor_id() else f"{pool}:{id(self)}"
        self._stop = threading.Event()
        if log is not None:
            self._send()
            threading.Thread(target=self._beat, name=f"{pool}-usage", daemon=True).start()

    def _send(self, wait: bool = False) -> None:
        sent = self.log.report.remote(Report(self.pool, self.actor, self.node, self.started, time.time(), self.busy,
                                             self.batches, self.rows))
        if wait:  # recorded before the batch's rows move on: the run's last batch is never missing from the log
            import ray

            ray.get(sent)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._send()

    @contextmanager
    def batch(self, rows: int = 0):
        """Time one batch of ``rows`` rows."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.busy += time.perf_counter() - t0
            self.batches += 1
            self.rows += rows
            if self.log is not None:
                self._send(wait=True)


def peak(intervals: Iterable[tuple[float, float]]) -> int:
    """The most intervals ``(start, end)`` open at one time."""
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals], key=lambda e: (e[0], e[1]))
    best = now = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def timeline(intervals: list[tuple[float, float]], origin: float) -> list[list[float]]:
    """``[seconds since origin, actors alive]`` at every change."""
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals], key=lambda e: (e[0], e[1]))
    out: list[list[float]] = []
    now = 0
    for t, step in events:
        now += step
        point = [round(t - origin, 1), now]
        if out and out[-1][0] == point[0]:
            out[-1] = point
        else:
            out.append(point)
    return out


def pool_usage(reports: Iterable[Report], origin: float) -> dict[str, dict]:
    """Per pool: ``peak_actors``, ``actors`` (all it ever had), ``actors_per_node``, ``busy_share``, the
    actor-seconds alive and busy, the rows and ``seconds_per_row`` (busy actor-seconds per row, measured), and
    ``actors_over_time`` (seconds since ``origin``)."""
    by_pool: dict[str, list[Report]] = {}
    for r in reports:
        by_pool.setdefault(r.pool, []).append(r)
    out = {}
    for pool, rs in sorted(by_pool.items()):
        intervals = [(r.started, max(r.seen, r.started)) for r in rs]
        alive = sum(b - a for a, b in intervals)
        busy, rows = sum(r.busy for r in rs), sum(r.rows for r in rs)
        out[pool] = {
            "peak_actors": peak(intervals),
            "actors": len(rs),
            "actors_per_node": dict(sorted(Counter(r.node[:12] for r in rs).items())),
            "busy_share": float(f"{busy / alive:.3g}") if alive > 0 else None,  # significant digits: never 0 if busy
            "actor_seconds_alive": round(alive, 2),
            "actor_seconds_busy": round(busy, 2),
            "batches": sum(r.batches for r in rs),
            "rows": rows,
            "seconds_per_row": float(f"{busy / rows:.4g}") if rows else None,
            "actors_over_time": timeline(intervals, origin),
        }
    return out


def bounding_pool(pools: dict[str, dict]) -> str | None:
    """The pool whose actors were busiest: the stage that bounded the job's throughput."""
    shares = {p: u["busy_share"] for p, u in pools.items() if u.get("busy_share") is not None}
    return max(shares, key=shares.get) if shares else None
