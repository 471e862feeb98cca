"""Faults in one process: the injection mechanism (``rag4dmc.actors.faults``), and what the shared stage code does with
each fault: transient errors retried and counted, a permanent error or poison row failing only its rows, a hung
call failing its rows after the timeout. The same faults through Ray are in ``tests/test_job_faults.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from rag4dmc.actors import faults
from rag4dmc.actors import stage as stage_module
from rag4dmc.actors.stage import Column, Produced, Stage, StagePolicy, apply
from rag4dmc.pipeline.schema import RETRIES, TASK_FAILED, TASK_I2T

FAST = StagePolicy(timeout_s=None, retries=2, backoff_s=0.0)


def _objects(values) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _batch(n: int, start: int = 0) -> dict[str, np.ndarray]:
    return {"row_key": _objects([f"s:{i}" for i in range(start, start + n)]), "task": _objects([TASK_I2T] * n),
            "error": _objects([""] * n), "v": np.arange(start, start + n, dtype=np.float64)}


class Double(Stage):
    name = "double"
    tasks = (TASK_I2T,)
    reads = ("v",)
    writes = (Column("out", -1.0, np.float64),)

    def __init__(self, policy: StagePolicy = FAST):
        self.policy, self.calls = policy, 0

    def process(self, rows):
        self.calls += 1
        return Produced({"out": 2 * rows["v"]})


def _child(code: str) -> subprocess.CompletedProcess:
    """``code`` in a new Python process (the fault plan in its environment): another worker."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


@pytest.fixture
def plan(monkeypatch, tmp_path):
    """Set RAG4DMC_FAULTS for this test (with a fresh state folder)."""
    def set_faults(*items: dict, shared: bool = True) -> None:
        value = {"dir": str(tmp_path / "state"), "faults": list(items)} if shared else list(items)
        monkeypatch.setenv(faults.ENV, json.dumps(value))

    yield set_faults
    monkeypatch.delenv(faults.ENV, raising=False)
    faults._current()  # forget this test's plan and counts


def test_no_faults_planned_costs_nothing_and_changes_nothing(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    stage = Double()
    out = apply(stage, _batch(4))
    assert out["out"].tolist() == [0, 2, 4, 6] and out[RETRIES].tolist() == [0] * 4 and stage.calls == 1
    assert faults.inject("double", ["s:0"]) is None


def test_a_transient_error_is_retried_and_the_retry_counted_on_its_rows(plan):
    plan({"stage": "double", "kind": "transient", "batch": 2})
    stage = Double()
    first, second, third = (apply(stage, _batch(3, s)) for s in (0, 3, 6))
    assert second["out"].tolist() == [6, 8, 10] and (second["task"] == TASK_I2T).all()
    assert second[RETRIES].tolist() == [1, 1, 1]
    assert first[RETRIES].tolist() == third[RETRIES].tolist() == [0, 0, 0]
    assert stage.calls == 3  # the injected error came before process: three batches, three calls


def test_a_transient_error_that_outlasts_the_retries_is_tried_row_by_row(plan):
    plan({"stage": "double", "kind": "transient", "batch": 1, "times": 3})  # the first call and both retries
    stage = Double(StagePolicy(timeout_s=None, retries=2, backoff_s=0.0))
    out = apply(stage, _batch(3))
    assert out["out"].tolist() == [0, 2, 4] and out[RETRIES].tolist() == [2, 2, 2]
    assert stage.calls == 3  # one per row after the batch gave up


def test_retries_wait_with_exponential_backoff(plan, monkeypatch):
    plan({"stage": "double", "kind": "transient", "batch": 1, "times": 2})
    waits: list[float] = []
    monkeypatch.setattr(stage_module.time, "sleep", waits.append)
    out = apply(Double(StagePolicy(timeout_s=None, retries=2, backoff_s=0.1)), _batch(2))
    assert waits == [0.1, 0.2] and out[RETRIES].tolist() == [2, 2]


def test_a_poison_row_fails_alone_and_its_batch_mates_complete(plan):
    plan({"stage": "double", "kind": "permanent", "row_key": "s:4"})
    out = apply(Double(), _batch(6))
    assert out["task"].tolist() == [TASK_I2T] * 4 + [TASK_FAILED, TASK_I2T]
    assert "injected permanent fault in double at row s:4" in out["error"][4]
    assert out["out"].tolist() == [0, 2, 4, 6, -1, 10]
    again = apply(Double(), _batch(6))  # a poison row fails every time
    assert again["task"][4] == TASK_FAILED


def test_a_permanent_batch_error_fails_that_batch_s_rows_with_the_reason(plan):
    plan({"stage": "double", "kind": "permanent", "batch": 2})
    stage = Double()
    first, second = apply(stage, _batch(2)), apply(stage, _batch(2, 2))
    assert (first["task"] == TASK_I2T).all()
    assert (second["task"] == TASK_FAILED).all()
    assert all("injected permanent fault in double" in e for e in second["error"])


@pytest.mark.timeout(15)  # the hang lasts 30 s: a stage that waited for it instead of its 0.5 s timeout fails here
def test_a_hung_call_fails_its_rows_after_the_timeout_and_the_next_batch_runs(plan):
    plan({"stage": "double", "kind": "hang", "batch": 1, "seconds": 30})
    stage = Double(StagePolicy(timeout_s=0.5, retries=2, backoff_s=0.0))
    hung = apply(stage, _batch(3))
    assert (hung["task"] == TASK_FAILED).all() and set(hung["error"]) == {"double timed out after 0.5 s"}
    assert hung[RETRIES].tolist() == [0, 0, 0]  # a timeout is not retried: it would hang again
    nxt = apply(stage, _batch(2, 3))
    assert nxt["out"].tolist() == [6, 8] and (nxt["task"] == TASK_I2T).all()


def test_a_fault_fires_at_most_times_in_all_processes_together(plan, tmp_path):
    """Marker files in the state folder: a replacement process does not fire the fault again."""
    plan({"stage": "double", "kind": "transient", "row_key": "s:0"})
    with pytest.raises(faults.TransientFault):
        faults.inject("double", ["s:0"])
    code = ("from rag4dmc.actors import faults\n"
            "faults.inject('double', ['s:0'])\n"  # the same row in a new process: already fired
            "print('no fault')")
    done = _child(code)
    assert done.stdout.strip() == "no fault", done.stderr
    assert sorted(p.name for p in (tmp_path / "state").glob("fault-*")) == ["fault-0-0"]


def test_an_exit_fault_kills_its_process(plan, tmp_path):
    plan({"stage": "double", "kind": "exit", "batch": 2})
    code = ("from rag4dmc.actors import faults\n"
            "faults.inject('double', ['s:0'])\n"
            "print('batch 1 done', flush=True)\n"
            "faults.inject('double', ['s:1'])\n"
            "print('batch 2 done')")
    done = _child(code)
    assert done.returncode == faults.EXIT_CODE and done.stdout.strip() == "batch 1 done"


def test_without_a_state_folder_each_process_counts_for_itself(plan):
    plan({"stage": "double", "kind": "transient", "batch": 1}, shared=False)
    with pytest.raises(faults.TransientFault):
        faults.inject("double", ["s:0"])
    faults.inject("double", ["s:1"])  # batch 2: nothing


@pytest.mark.parametrize("value, message", [
    ("not json", "is not JSON"),
    ('[{"stage": "embed", "kind": "explode", "batch": 1}]', "kind must be one of"),
    ('[{"stage": "embed", "kind": "exit"}]', "exactly one trigger"),
    ('[{"stage": "embed", "kind": "exit", "batch": 0}]', "batch counts from 1"),
    ('[{"stage": "embed", "kind": "exit", "batch": 1, "when": 3}]', "fields: stage, kind"),
])
def test_a_wrong_fault_plan_says_what_is_wrong(value, message):
    with pytest.raises(ValueError, match=message):
        faults.parse(value)


def test_with_a_state_folder_batches_are_numbered_across_processes(plan):
    """Batch 2 of a stage is the second batch any process starts: here the child's first."""
    plan({"stage": "double", "kind": "transient", "batch": 2})
    faults.inject("double", ["s:0"])  # batch 1, in this process
    code = ("from rag4dmc.actors import faults\n"
            "try:\n"
            "    faults.inject('double', ['s:1'])\n"
            "except faults.TransientFault as exc:\n"
            "    print('fired:', exc)\n")
    done = _child(code)
    assert done.stdout.strip() == "fired: injected transient fault in double at batch 2", done.stderr
