"""The default job on a simulated multi-node, multi-GPU cluster (``tests/multinode.py``, in a process of its own):
every row comes out once, the pools spread over the nodes, GPU pools land on the GPU nodes and are sized from the
cluster, the BLIP2 and SDXL classes complete rows through the same plan (n candidates scored in the actor), the dry
run starts nothing, and a local path a node does not see is refused naming it."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from rag4dmc.pipeline.io.storage import Storage
from rag4dmc.pipeline.job.runner import read_output
from tests.conftest import REPO_ROOT
from tests.multinode import CPU_ROWS, CPU_SHARDS, GPU_ROWS, WORKER, WORKERS
from tests.tiny_models import TINY_IMAGE


@pytest.fixture(scope="module")
def run(kb, tmp_path_factory):
    work = tmp_path_factory.mktemp("multinode")
    result = work / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "tests.multinode", str(work), str(result), kb], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return work, json.loads(result.read_text())


def _exactly_once(out, n: int, summary: dict) -> None:
    table = read_output(Storage(), str(out)).to_pandas()
    assert len(table) == n == summary["rows_out"] == summary["unique_row_keys"] and table.row_key.is_unique
    assert summary["failed"] == 0


@pytest.mark.timeout(1600)
def test_the_default_job_on_three_nodes_completes_every_row_once_with_its_pools_spread_over_the_nodes(run):
    work, result = run
    assert len(result["nodes"]) == 1 + WORKERS
    summary = result["cpu"]
    _exactly_once(work / "out-cpu", CPU_ROWS, summary)
    nodes = {node for pool in summary["pools"].values() for node in pool["actors_per_node"]}
    assert len(nodes) >= 2, summary["pools"]
    # sized from the cluster's CPUs, not one actor a pool: the costliest pool by its declaration may grow past one
    costliest = max(result["dry_run"]["pools"].items(), key=lambda p: p[1]["seconds_per_row"])[0]
    assert summary["pools"][costliest]["max_actors"] > 1
    assert summary["bounded_by"] in summary["pools"]


@pytest.mark.timeout(1600)
def test_gpu_pools_land_on_the_gpu_nodes_sized_from_their_gpus_and_run_the_models_on_cpu_there(run):
    work, result = run
    summary = result["gpu"]
    _exactly_once(work / "out-gpu", GPU_ROWS, summary)
    gpu_nodes = {node for node, res in result["nodes"].items() if res.get("GPU")}
    assert len(gpu_nodes) == WORKERS
    gpus = WORKERS * WORKER["num_gpus"]
    generators = {name: pool for name, pool in summary["pools"].items() if name.startswith("generate:")}
    for name, pool in generators.items():
        assert pool["num_gpus"] > 0 and set(pool["actors_per_node"]) <= gpu_nodes, (name, pool)
    assert sum(p["max_actors"] for p in generators.values()) == gpus  # a generator on every GPU, never two on one
    # SDXL's declared cost is 8x BLIP2's: the text -> image pool gets the most actors
    assert generators["generate:t2i"]["max_actors"] > generators["generate:i2t"]["max_actors"]
    done = read_output(Storage(), str(work / "out-gpu")).to_pandas()
    done = done[done.status == "completed"]
    # The models ran (on CPU: no CUDA), through the same plan as the stand-ins: n candidates scored in the actor
    assert set(done.generated) == {"text", "image"}
    assert {g.split(":", 1)[0]: g.split(":", 1)[1] for g in done.generator} == {
        "blip2": str(work / "weights" / "blip2"), "sdxl": str(work / "weights" / "sdxl")}
    for _, row in done.iterrows():
        assert len(row.candidate_scores) == 2 and 0 <= row.chosen < 2  # tiny_model_job's two candidates
    for img in done[done.generated == "image"].image:
        assert Image.open(io.BytesIO(img)).size == (TINY_IMAGE, TINY_IMAGE)
    assert done[done.generated == "text"].text.str.len().min() > 0


def test_the_dry_run_prints_the_plan_and_starts_nothing(run):
    work, result = run
    plan = result["dry_run"]
    assert result["dry_run_wrote"] == []  # no run.json, no output
    assert plan["rows"]["i2t"] + plan["rows"]["t2i"] + plan["rows"]["observed"] == CPU_ROWS
    assert plan["rows_estimated_from_shards"] == [CPU_SHARDS, CPU_SHARDS]
    assert set(plan["pools"]) == set(result["cpu"]["pools"])
    assert plan["gpu_hours"] == 0 and plan["cpu_core_hours"] > 0 and plan["wall_seconds"] > 0
    # the slowest pool by its declared cost sets the wall time: its direction's rows x seconds per row / actors
    slowest = max(plan["rows"][name.split(":")[1]] * p["seconds_per_row"] / p["max_actors"]
                  for name, p in plan["pools"].items())
    assert plan["wall_seconds"] == pytest.approx(slowest, rel=0.01)


def test_a_local_path_that_a_node_does_not_see_is_refused_naming_the_node(run):
    _, result = run
    assert "does not see" in result["unseen_path"] and "s3://" in result["unseen_path"]
