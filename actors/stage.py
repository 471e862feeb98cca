"""The stage contract every step of the completion chain follows (after NeMo Curator's ``ProcessingStage``).

A stage declares

* ``tasks``: the rows it handles (by their ``task``: ``i2t``, ``t2i``, ``observed``); failed rows are never
  handed to a stage;
* ``reads``: the columns :meth:`Stage.process` needs;
* ``writes``: the columns it produces, with the value rows it does not handle get when the column is new;
* ``drops``: columns no later stage needs (removed from every row after it, so they do not travel);
* ``RESOURCES``: what one actor (or task) of it takes from the cluster (``actors/resources.py``).

It has :meth:`Stage.setup` (once per actor: load a model, a KB shard) and a pure :meth:`Stage.process`:
its own rows' ``reads`` columns in, a :class:`Produced` with the new columns (and, per row, why it failed)
out. :func:`apply` does the rest for every stage alike: select the rows, call ``process``, scatter the new
columns back beside the rows it did not touch, add the stage's seconds to ``seconds_<accounts>``, and turn
an exception into the failure of the rows it came from (alone, when a batch-wide call fails).
:func:`check_chain` verifies, before anything runs, that each stage's inputs are produced upstream.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from rag4dmc.actors import faults
from rag4dmc.actors.resources import Resources
from rag4dmc.pipeline.schema import RETRIES, TASK_FAILED, restore_nulls, typed_block

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]


class ChainError(ValueError):
    """A chain of stages whose declared inputs and outputs do not connect."""


TRANSIENT_ERRORS = (ConnectionError, TimeoutError)  # worth retrying as they are: a dropped connection, a slow peer


class BatchTimeout(Exception):
    """A stage's call on one batch ran past ``StagePolicy.timeout_s``."""



@dataclass(frozen=True)
class StagePolicy:
    """How :func:`apply` treats a failing call (``JobConfig.batch_timeout_s``, ``transient_retries``,
    ``retry_backoff_s``): transient errors are retried on the whole batch, with exponential backoff; then a
    batch that still raises is retried row by row, so only the rows that raise fail; a call past the timeout
    fails its rows with the reason. The default (Serve, the evaluation, tests) retries nothing and never times out.

    A call past the timeout cannot be stopped from Python: it stays behind in its worker, holding the model,
    while the worker goes on with its next batch. Exiting the worker instead (so that Ray replaces it) was
    tried and dropped: Ray may recompute the blocks a dead worker had returned, so the timed-out rows would
    then complete or fail by chance."""

    timeout_s: float | None = None
    retries: int = 0
    backoff_s: float = 0.0


@dataclass(frozen=True)
class Column:
    """A column a stage writes. Rows the stage does not handle get ``fill`` when the column is new: an object
    column by default, or ``dtype`` with ``shape`` per row (embeddings, neighbour lists, pixels), so every
    block of the column has one Arrow type whatever rows it holds."""

    name: str
    fill: Any = None
    dtype: Any = object
    shape: tuple[int, ...] = ()

    def empty(self, n: int) -> np.ndarray:
        return np.full((n, *self.shape), self.fill, dtype=self.dtype)


@dataclass
class Produced:
    """What :meth:`Stage.process` returns for its ``m`` rows: each written column (length ``m``), and per row
    ``None`` or the reason it failed (``errors``, optional)."""

    columns: dict[str, Any]
    errors: list[str | None] | None = None


class Stage:
    """Base class of a stage; subclasses set the declarations and implement :meth:`process`."""

    name: ClassVar[str] = "stage"
    accounts: ClassVar[str | None] = None  # seconds_<accounts> collects its actor-seconds per row
    RESOURCES: ClassVar[Resources] = Resources()
    ACTOR: ClassVar[bool] = True  # an actor pool (a model, a KB shard to hold); False: a stateless CPU task
    policy: StagePolicy = StagePolicy()  # set per job by the plan (``rag4dmc.pipeline.job.mapper.direction_stages``, from JobConfig)
    tasks: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    writes: tuple[Column, ...] = ()
    drops: tuple[str, ...] = ()

    _ready = False

    def setup(self) -> None:
        """Load what the stage needs, once per actor (models, KB shards). Default: nothing."""

    def process(self, rows: Batch) -> Produced:
        raise NotImplementedError

    def ensure_setup(self) -> None:
        if not self._ready:
            self.setup()
            self._ready = True

    def __call__(self, batch: Batch) -> Batch:
        self.ensure_setup()
        return apply(self, restore_nulls(batch))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({'/'.join(self.tasks)})"


def object_column(values) -> np.ndarray:
    """An object column of ``values``, filled item by item (numpy must not split bytes or nest lists)."""
    values = list(values)
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _column(values: Any, m: int) -> np.ndarray:
    """A stage's values as an array of length ``m`` (lists of objects become object arrays, item by item)."""
    if isinstance(values, np.ndarray):
        return values
    out = np.empty(m, dtype=object)
    out[:] = list(values) if m else []
    return out


def _call(stage: Stage, rows: Batch, new_batch: bool) -> Produced:
    """``stage.process(rows)`` (after the planned faults, ``rag4dmc.actors.faults``), bounded by the policy's timeout.

    With a timeout the call runs in a thread that is waited for at most that long: a call that never returns
    cannot be stopped from Python, so it is left behind (logged) and its rows fail instead of the job hanging."""
    def run() -> Produced:
        faults.inject(stage.name, rows["row_key"], new_batch)
        return stage.process(rows)

    timeout = stage.policy.timeout_s
    if timeout is None:
        return run()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = run()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=target, name=f"{stage.name}-batch", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        log.error("%s: a call on %d rows is still running after %g s; its rows fail and the call is left behind",
                  stage.name, len(rows["row_key"]), timeout)
        raise BatchTimeout(f"{stage.name} timed out after {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["result"]


def _with_retries(stage: Stage, rows: Batch, m: int) -> tuple[Produced, int]:
    """The batch call, its transient errors retried (``StagePolicy``); then row by row if it still raises.
    Returns what it produced and how many times the batch was retried."""
    policy = stage.policy
    for attempt in range(policy.retries + 1):
        try:
            return _call(stage, rows, new_batch=attempt == 0), attempt
        except BatchTimeout as exc:
            return Produced({}, [str(exc)] * m), attempt
        except TRANSIENT_ERRORS as exc:
            if attempt == policy.retries:
                log.warning("%s: transient error on a batch of %d rows after %d retries (%s); retrying its rows one "
                            "by one", stage.name, m, attempt, exc)
                return _one_by_one(stage, rows, m), attempt
            wait = policy.backoff_s * 2 ** attempt
            log.warning("%s: transient error on a batch of %d rows (%s); retry %d of %d in %.1f s", stage.name, m, exc,
                        attempt + 1, policy.retries, wait)
            time.sleep(wait)
        except Exception as exc:  # noqa: BLE001 - isolate the row(s) that raised
            log.warning("%s failed on a batch of %d rows (%s); retrying its rows one by one", stage.name, m, exc)
            return _one_by_one(stage, rows, m), attempt
    raise AssertionError("unreachable")


def _one_by_one(stage: Stage, rows: Batch, m: int) -> Produced:
    """``process`` row by row after a batch-wide call raised: each row's own exception fails that row only."""
    columns = {c.name: c.empty(m) for c in stage.writes}
    errors: list[str | None] = []
    for j in range(m):
        try:
            got = _call(stage, {k: v[j:j + 1] for k, v in rows.items()}, new_batch=False)
        except BatchTimeout as exc:
            errors.append(str(exc))
            continue
        except Exception as exc:  # noqa: BLE001 - the row's failure, with the reason, is the contract
            log.warning("%s failed on row %s: %s", stage.name, rows["row_key"][j], exc)
            errors.append(f"{stage.name} failed: {type(exc).__name__}: {exc}")
            continue
        for name, values in got.columns.items():
            columns[name][j] = _column(values, 1)[0]
        errors.append(got.errors[0] if got.errors else None)
    return Produced(columns, errors)


def apply(stage: Stage, batch: Batch) -> Batch:
    """Run ``stage`` on its rows of ``batch``: the shared selection, scatter, pass-through, seconds accounting
    and failure handling. Returns a new batch; no array of ``batch`` is modified."""
    n = len(batch["row_key"])
    task = np.asarray(batch["task"], dtype=object)
    idx = np.flatnonzero(np.isin(task, stage.tasks))
    m = idx.size
    out = {k: v for k, v in batch.items() if k not in stage.drops}
    t0 = time.perf_counter()
    produced, retried = Produced({}, None), 0
    if m:
        rows = {c: np.asarray(batch[c])[idx] for c in ("row_key", "task", *stage.reads)}
        produced, retried = _with_retries(stage, rows, m)
    spent = time.perf_counter() - t0
    errors = produced.errors or [None] * m
    if len(errors) != m:
        raise ValueError(f"{stage.name} returned {len(errors)} errors for {m} rows")
    for col in stage.writes:
        base = np.array(batch[col.name], copy=True) if col.name in batch else col.empty(n)
        if col.name in produced.columns:
            values = _column(produced.columns[col.name], m)
            if len(values) != m:
                raise ValueError(f"{stage.name} wrote {len(values)} values of {col.name!r} for {m} rows")
            base[idx] = values
        out[col.name] = base
    failed = [j for j, e in enumerate(errors) if e]
    if failed:
        new_task, new_error = task.copy(), np.array(batch["error"], dtype=object, copy=True)
        new_task[idx[failed]] = TASK_FAILED
        for j in failed:
            new_error[idx[j]] = errors[j]
        out["task"], out["error"] = new_task, new_error
    count = np.array(batch[RETRIES], dtype=np.int32, copy=True) if RETRIES in batch else np.zeros(n, np.int32)
    count[idx] += retried
    out[RETRIES] = count  # every block carries it: one schema whatever was retried
    if stage.accounts and m:
        key = f"seconds_{stage.accounts}"
        seconds = np.array(batch[key], dtype=np.float32, copy=True) if key in batch else np.zeros(n, np.float32)
        seconds[idx] += spent / m
        out[key] = seconds
    return out


def run_chain(stages: Iterable[Stage], batch: Batch) -> Batch:
    """Every stage in order on one numpy batch, in this process (tests, evaluation, the benchmark's loop)."""
    for stage in stages:
        stage.ensure_setup()
        batch = apply(stage, batch)
    return batch


@dataclass
class ChainCheck:
    """The columns available after each stage (for error messages and docs)."""

    available: list[set[str]] = field(default_factory=list)


def check_chain(stages: Sequence[Stage], source: Iterable[str], sink: Iterable[str] = (),
                describe: Callable[[Stage], str] = repr) -> ChainCheck:
    """Verify, before any actor starts, that every stage's ``reads`` (and the sink's) are produced upstream."""
    available = set(source)
    check = ChainCheck()
    for pos, stage in enumerate(stages):
        missing = [c for c in stage.reads if c not in available]
        if missing:
            producers = [describe(s) for s in stages[pos + 1:] if any(w.name in missing for w in s.writes)]
            hint = f"; {', '.join(producers)} writes it but runs later" if producers else ""
            raise ChainError(f"stage {pos} {describe(stage)} reads {missing}, which no stage before it writes "
                             f"(available: {sorted(available)}){hint}")
        available |= {c.name for c in stage.writes}
        available -= set(stage.drops)
        check.available.append(set(available))
    missing = [c for c in sink if c not in available]
    if missing:
        raise ChainError(f"the output needs {missing}, which no stage writes (available: {sorted(available)})")
    return check


def run_stage(batch: Batch, *, stage: Stage):
    """One batch through ``stage`` (``setup`` first if it has not run), typed for the next operator: what Ray Data
    calls per batch, as a task for a CPU stage and inside an actor (``rag4dmc.pipeline.job.stage_actor.StageActor``) for the rest.

    It lives here, beside the contract, rather than in the job plan: a task worker imports only this module and
    the stage's own, not the plan's model libraries (importing ``rag4dmc.pipeline.job.mapper`` costs a fresh worker about 4 s of
    CPU and 770 MiB of RSS, torch and FAISS most of it; ``rag4dmc.pipeline.kb.build_memory.BASE_PROCESS_BYTES``)."""
    stage.ensure_setup()
    return typed_block(apply(stage, restore_nulls(batch)))
