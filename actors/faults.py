"""Deterministic fault injection, a testing aid: off unless ``RAG4DMC_FAULTS`` is set, and free when off.

The shared stage code (:func:`rag4dmc.actors.stage.apply`) calls :func:`inject` before every call of a stage's
``process``. A fault names a stage and a trigger, the stage's Nth batch in its process or the row with a
given key, and what happens then:

* ``transient``: raise :class:`TransientFault` (a ``ConnectionError``, retried as any transient error is);
* ``permanent``: raise :class:`InjectedFault`: with ``row_key`` on every call holding that row (a poison row,
  ``times`` does not apply); with ``batch`` on that batch's rows, whichever way they are called again;
* ``exit``: kill the worker process (``os._exit``), as a preempted node or an OOM kill would;
* ``hang``: sleep ``seconds`` (past ``job.batch_timeout_s``);
* ``kill_job``: SIGKILL the job's process group (the driver's, :func:`register_job`): a job started in a
  session of its own dies at once, as on a power cut: its driver, and its local Ray cluster if it started one
  (on a running cluster, Ray then ends the dead driver's actors and tasks, as for a preempted driver). The
  output sink's stage is ``commit``: its batch N is the Nth block committed, so a job can be killed after
  exactly N committed blocks.

``RAG4DMC_FAULTS`` holds JSON: a list of faults, or ``{"dir": DIR, "faults": [...]}``. With ``dir`` (a folder
every worker of the node can write), batches are numbered across all processes (a locked counter file per
stage) and each fault fires at most ``times`` times in all of them together (marker files), so a fault that
kills a process does not fire again in the process that replaces it. Without it, each process numbers its
batches and counts its faults for itself. For example::

    RAG4DMC_FAULTS='{"dir": "/tmp/faults", "faults": [{"stage": "embed", "kind": "exit", "batch": 2}]}'

Ray workers of a local cluster started after it was set inherit the variable; the job also passes it to its
tasks and actors in their runtime environment (:func:`remote_args`), so it reaches a cluster started before.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "RAG4DMC_FAULTS"
JOB_GROUP_ENV = "RAG4DMC_FAULTS_JOB_PGID"  # the driver's process group, for ``kill_job`` (``register_job``)
KINDS = ("transient", "permanent", "exit", "hang", "kill_job")
EXIT_CODE = 17  # what an injected ``exit`` leaves in the worker's log


class InjectedFault(RuntimeError):
    """A permanent error raised by fault injection."""


class TransientFault(ConnectionError):
    """A transient error raised by fault injection (a ``ConnectionError``: the stage code retries it)."""


@dataclass(frozen=True)
class Fault:
    """One fault: where (``stage``; ``batch`` N counted from 1 in each process, or ``row_key``), what
    (``kind``), how often in all (``times``, with a state folder) and, for ``hang``, for how long."""

    stage: str
    kind: str
    batch: int | None = None
    row_key: str | None = None
    times: int = 1
    seconds: float = 3600.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{ENV}: fault kind must be one of {KINDS}, got {self.kind!r}")
        if (self.batch is None) == (self.row_key is None):
            raise ValueError(f"{ENV}: a fault needs exactly one trigger, batch or row_key: {self}")
        if self.batch is not None and self.batch < 1:
            raise ValueError(f"{ENV}: batch counts from 1, got {self.batch}")
        if self.times < 1 or self.seconds <= 0:
            raise ValueError(f"{ENV}: times must be >= 1 and seconds > 0: {self}")


@dataclass(frozen=True)
class Plan:
    faults: tuple[Fault, ...]
    state_dir: Path | None = None


def parse(text: str) -> Plan:
    """The faults of a ``RAG4DMC_FAULTS`` value (a JSON list, or an object with ``dir`` and ``faults``)."""
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{ENV} is not JSON ({exc}): give a list of faults, e.g. "
                         '[{"stage": "embed", "kind": "transient", "batch": 1}]') from None
    items, folder = (spec, None) if isinstance(spec, list) else (spec.get("faults", []), spec.get("dir"))
    try:
        faults = tuple(Fault(**item) for item in items)
    except TypeError as exc:
        raise ValueError(f"{ENV}: {exc} (fields: stage, kind, batch, row_key, times, seconds)") from None
    return Plan(faults, Path(folder) if folder else None)


_plan: Plan | None = None
_loaded_from: str | None = None
_batches: Counter = Counter()  # per stage: the number of this process's current batch
_fired: Counter = Counter()  # firings per fault in this process (without a state folder)
_poisoned: set[str] = set()  # row keys of batches a permanent batch fault hit


def _current() -> Plan | None:
    global _plan, _loaded_from
    text = os.environ.get(ENV)
    if text != _loaded_from:
        _plan, _loaded_from = (parse(text) if text else None), text
        _batches.clear(), _fired.clear(), _poisoned.clear()
    return _plan


def _next_batch(plan: Plan, stage: str) -> int:
    """The number of a new batch of ``stage``: counted in this process, or across processes in the state folder."""
    if plan.state_dir is None:
        return _batches[stage] + 1
    import fcntl

    plan.state_dir.mkdir(parents=True, exist_ok=True)
    with open(plan.state_dir / f"batches-{stage}", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        f.seek(0)
        n = int(f.read() or 0) + 1
        f.seek(0)
        f.truncate()
        f.write(str(n))
    return n


def _claim(plan: Plan, index: int, fault: Fault) -> bool:
    """Whether fault ``index`` may fire once more (and count it): marker files shared by every process."""
    if plan.state_dir is None:
        if _fired[index] >= fault.times:
            return False
        _fired[index] += 1
        return True
    plan.state_dir.mkdir(parents=True, exist_ok=True)
    for n in range(fault.times):
        try:
            fd = os.open(plan.state_dir / f"fault-{index}-{n}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        return True
    return False


def remote_args() -> dict:
    """Ray remote arguments that carry this process's fault plan to the job's workers (``{}`` when none is
    set), so that a cluster started before the plan was set, such as a test session's, runs the job's tasks and
    actors in workers that see it."""
    text = os.environ.get(ENV)
    if not text:
        return {}
    group = os.environ.get(JOB_GROUP_ENV)
    return {"runtime_env": {"env_vars": {ENV: text, **({JOB_GROUP_ENV: group} if group else {})}}}


def register_job() -> None:
    """On the driver, before it starts or joins Ray: name its process group for ``kill_job`` (the workers of a
    local cluster inherit the variable, those of a running cluster get it with the plan, :func:`remote_args`;
    Ray may put them in process groups of their own)."""
    if ENV in os.environ:
        os.environ[JOB_GROUP_ENV] = str(os.getpgid(0))


def inject(stage: str, row_keys: Sequence[str], new_batch: bool = True) -> None:
    """Fire the faults planned for this call of ``stage`` on these rows (``new_batch``: a batch, not one of
    its rows retried alone). Returns at once when no faults are planned."""
    if ENV not in os.environ:
        return
    plan = _current()
    if plan is None:
        return
    if new_batch:
        _batches[stage] = _next_batch(plan, stage)
    keys = set(row_keys)
    if keys & _poisoned:
        raise InjectedFault(f"injected permanent fault in {stage} (its batch was hit)")
    for index, fault in enumerate(plan.faults):
        if fault.stage != stage:
            continue
        # a batch's retries and row-by-row calls are calls of that batch too
        hit = fault.row_key in keys if fault.row_key is not None else _batches[stage] == fault.batch
        if not hit:
            continue
        poison_row = fault.kind == "permanent" and fault.row_key is not None  # fails on every call, as a bad row
        if not poison_row and not _claim(plan, index, fault):
            continue
        where = f"row {fault.row_key}" if fault.row_key is not None else f"batch {fault.batch}"
        log.warning("fault injection: %s in %s at %s (pid %d)", fault.kind, stage, where, os.getpid())
        if fault.kind == "exit":
            os._exit(EXIT_CODE)
        if fault.kind == "kill_job":
            import signal

            os.killpg(int(os.environ.get(JOB_GROUP_ENV) or os.getpgid(0)), signal.SIGKILL)
        if fault.kind == "hang":
            time.sleep(fault.seconds)
        elif fault.kind == "transient":
            raise TransientFault(f"injected transient fault in {stage} at {where}")
        else:
            if fault.batch is not None:
                _poisoned.update(keys)
            raise InjectedFault(f"injected permanent fault in {stage} at {where}")
