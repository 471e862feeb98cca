"""How many rows the job holds in flight: read, not yet committed. A kill loses at most these.

Each read task (one input shard) asks :class:`InFlight` for room for its rows before it yields them; the
output sink gives the room back as their blocks are committed. The limit is ``max_blocks_in_flight`` blocks
of ``block_rows`` rows (``JobConfig``); by default enough to keep every pool of the plan fed twice over.

Two rules keep the limit from stalling the job. Ray Data waits for a full batch before it calls an actor, so
rows can sit in partial batches, up to one batch per pool (the *floor*): a read is let in whenever fewer
rows than that are in flight, and the plan refuses a limit below floor + one block (:func:`check_limit`).
A read task's rows enter together (Ray Data hands a read's output on when the task ends), so the bound is
the limit, or the floor plus one input shard when shards are larger than the limit.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)

# A read task waits this long for room, then goes ahead (logged): a hang guard, never reached in a healthy run.
MAX_WAIT_S = 300.0


def min_rows(batch_sizes: list[int], block_rows: int) -> int:
    """Fewest rows in flight that cannot stall: every operator may hold a partial batch while one more block
    comes in."""
    return sum(batch_sizes) + block_rows


def default_blocks(pool_rows: list[int], batch_sizes: list[int], block_rows: int) -> int:
    """Blocks in flight by default: twice what the pools hold at once (``pool_rows``: max actors x batch size
    per pool), and never fewer than can avoid a stall."""
    need = max(2 * sum(pool_rows), min_rows(batch_sizes, block_rows))
    return -(-need // block_rows)


def check_limit(blocks: int, block_rows: int, batch_sizes: list[int]) -> None:
    """Refuse a limit too small for the plan's batches."""
    from rag4dmc.pipeline.config import ConfigError

    need = min_rows(batch_sizes, block_rows)
    if blocks * block_rows < need:
        raise ConfigError(
            f"max_blocks_in_flight={blocks} x block_rows={block_rows} = {blocks * block_rows} rows cannot fill "
            f"the plan's batches ({need} rows: each stage waits for a full batch); set max_blocks_in_flight to at "
            f"least {-(-need // block_rows)}, or leave it unset")


class InFlight:
    """A Ray actor (no CPU) counting the rows between read and commit, holding reads back at the limit."""

    def __init__(self, limit_rows: int, floor_rows: int = 0):
        self.limit, self.floor, self.rows, self.peak = limit_rows, floor_rows, 0, 0
        self.largest_read, self.held = 0, 0  # the most rows one read brought in; reads that had to wait
        self.changed = asyncio.Condition()

    def _room(self, rows: int) -> bool:
        return self.rows + rows <= self.limit or self.rows <= self.floor

    async def acquire(self, rows: int) -> None:
        async with self.changed:
            self.largest_read = max(self.largest_read, rows)
            self.held += not self._room(rows)
            try:
                await asyncio.wait_for(self.changed.wait_for(lambda: self._room(rows)), MAX_WAIT_S)
            except asyncio.TimeoutError:
                log.warning("a read waited %.0f s for room (%d rows in flight, limit %d); going ahead",
                            MAX_WAIT_S, self.rows, self.limit)
            self.rows += rows
            self.peak = max(self.peak, self.rows)

    async def release(self, rows: int) -> None:
        async with self.changed:
            self.rows -= rows
            self.changed.notify_all()

    def stats(self) -> dict:
        return {"limit_rows": self.limit, "floor_rows": self.floor, "in_flight_rows": self.rows,
                "peak_rows_in_flight": self.peak, "largest_read_rows": self.largest_read, "reads_held_back": self.held,
                "bound_rows": max(self.limit, self.floor + self.largest_read)}
