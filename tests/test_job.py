"""The completion job on a real local Ray (2 CPUs): every input row comes out exactly once.

Knowledge base and data are generated; encoders are the real lite towers and generation is the
offline nearest-neighbour generator, so these tests run the same classes as production on CPU.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rag4dmc.pipeline.config import (
    CalibrationConfig,
    JobConfig,
    KBConfig,
    MappingConfig,
    StageResources,
)
from rag4dmc.pipeline.demo.corpus import make_external, make_incomplete, make_internal, write_split
from rag4dmc.pipeline.io.datasets import write_parquet
from rag4dmc.pipeline.io.storage import Storage
from rag4dmc.pipeline.job.kb_runner import KBBuildSpec, run_kb_build
from rag4dmc.pipeline.job.runner import JobSpec, RunMismatch, read_output, run_job

REPO = Path(__file__).resolve().parents[1]
JOB = JobConfig()  # defaults: NIQE's parameters found where `rag4dmc setup` (make env) installed them
# The job's own behaviour (rows, resume, retry, storage) does not depend on the KB's settings: no calibration
# here keeps the module's KB build short; tests/test_real_data.py runs the job on a calibrated KB.
# Jobs that test how rows flow (blocks, batches, commits) score image candidates without NIQE: its model loads in
# the image generator and scores every candidate, the slowest stage of these small jobs. The other jobs here keep
# the default selection.
FLOW_SELECTION = JOB.selection.model_copy(update={"image_quality": "none"})
FAST_KB = KBConfig(mapping=MappingConfig(max_epochs=30, hidden_dim=256), calibration=CalibrationConfig(enabled=False))


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_kb_sources(root: Path | str) -> tuple[str, str]:
    """The internal and external pairs of the job's small KB, written under ``root``; their two folders."""
    write_split(make_internal(150, seed=0).select(["id", "image", "text"]), f"{root}/internal")
    write_split(make_external(150, seed=0).select(["id", "image", "text"]), f"{root}/external")
    return f"{root}/internal", f"{root}/external"


def kb_sources(kb: str) -> tuple[str, str]:
    """The internal and external folders a KB of :func:`build_job_kb` was built from."""
    root = Path(kb).parent
    return str(root / "internal"), str(root / "external")


def build_job_kb(root: Path) -> str:
    """The small KB the job's tests complete against (generated pairs, lite encoders, no calibration)."""
    internal, external = write_kb_sources(root)
    run_kb_build(KBBuildSpec(internal=internal, external=external, out=f"{root}/kb", cfg=FAST_KB))
    return f"{root}/kb"


def _incomplete(n: int, seed: int = 1) -> pa.Table:
    return make_incomplete(n, seed=seed, missing_rate=0.8).select(["id", "image", "text"])


def _bad_rows(tmp: Path) -> pa.Table:
    """One row per kind of bad input the job must survive."""
    bomb = _png(Image.new("1", (20000, 20000)))  # 400 Mpx declared, a few kB on disk
    rows = [
        ("bad-undecodable", b"this is not an image", None),
        ("bad-zero-bytes", b"", "a caption whose image is empty bytes"),  # -> t2i: text only
        ("bad-bomb", bomb, None),
        ("bad-neither", None, "   "),
        ("bad-empty-both", None, None),
        ("dup-id", None, "one red circle on the left"),
        ("dup-id", None, "two blue squares at the top"),
    ]
    table = pa.table({"id": [r[0] for r in rows], "image": pa.array([r[1] for r in rows], pa.binary()),
                      "text": [r[2] for r in rows]})
    uri_rows = pa.table({"id": ["bad-missing-uri"], "image": [str(tmp / "nowhere.png")], "text": [None]})
    return table, uri_rows


@dataclass(frozen=True)
class BadInputRun:
    """One job over good rows and every kind of bad input, run once for the module: its data, output and summary."""

    data: Path
    out: Path
    summary: dict
    good: pa.Table
    bad: pa.Table
    uri_rows: pa.Table
    missing: Path  # the image a row names that does not exist (yet)


@pytest.fixture(scope="module")
def bad_input_run(kb, tmp_path_factory) -> BadInputRun:
    root = tmp_path_factory.mktemp("bad-input")
    data = root / "data"
    good = _incomplete(60)
    write_split(good, data, 3)
    bad, uri_rows = _bad_rows(root)
    write_parquet(bad, f"{data}/bad-0.parquet")
    write_parquet(uri_rows, f"{data}/bad-uri.parquet")
    (data / "corrupt.parquet").write_bytes(b"PAR1 definitely not parquet")
    summary = run_job(JobSpec(data=str(data), kb=kb, out=str(root / "out"), cfg=JOB))
    return BadInputRun(data, root / "out", summary, good, bad, uri_rows, root / "nowhere.png")


@pytest.mark.timeout(600)
def test_every_row_comes_out_exactly_once_with_bad_input_accounted_for(bad_input_run):
    run = bad_input_run
    out = read_output(Storage(), str(run.out)).to_pandas()
    good, bad, uri_rows, summary = run.good, run.bad, run.uri_rows, run.summary

    n_in = good.num_rows + bad.num_rows + uri_rows.num_rows + 1  # + one row reporting the corrupt shard
    assert len(out) == n_in == summary["rows_out"]
    assert out.row_key.is_unique
    assert summary["observed"] + summary["completed"] + summary["failed"] == n_in
    by_id = out.groupby("id")
    assert len(by_id.get_group("dup-id")) == 2  # duplicate user ids stay distinct rows

    def status(i):
        return out.loc[out.id == i, "status"].item()

    def error(i):
        return out.loc[out.id == i, "error"].item()

    assert status("bad-undecodable") == "failed" and "could not be decoded" in error("bad-undecodable")
    assert status("bad-bomb") == "failed" and "decompression" in error("bad-bomb")
    assert status("bad-neither") == "failed" and "neither" in error("bad-neither")
    assert status("bad-empty-both") == "failed"
    assert status("bad-missing-uri") == "failed" and "not found" in error("bad-missing-uri")
    assert status("bad-zero-bytes") == "completed"
    corrupt = out[out.row_key.str.startswith("corrupt.parquet")]
    assert len(corrupt) == 1 and corrupt.status.item() == "failed" and "corrupt" in corrupt.error.item()

    done = out[out.status == "completed"]
    assert len(done) >= 45 and set(done.generated) == {"text", "image"}
    assert (done.generator == "nn-consensus-retrieval").all()
    assert done.retrieved_ids.map(len).min() >= 1 and done.candidate_scores.map(len).min() >= 1
    assert done.kb_version.nunique() == 1 and done.config_hash.nunique() == 1
    texts = done[done.generated == "text"]
    assert texts.text.str.len().min() > 0
    images = done[done.generated == "image"]
    assert all(Image.open(io.BytesIO(b)).size[0] > 0 for b in images.image)
    observed = out[out.status == "observed"]
    original = good.to_pandas().set_index("id")
    for _, row in observed.iterrows():  # complete pairs pass through unchanged
        assert row.text == original.loc[row.id, "text"] and row.image == original.loc[row.id, "image"]
    summary_file = run.out / "summary.json"
    assert summary_file.exists() and summary["actor_seconds_per_completed_row"]["embed"] > 0
    # how the cluster was used: every pool ran, each actor's batches within the time it was alive
    pools = summary["pools"]
    assert set(pools) == {"embed:i2t", "retrieve:i2t:0", "generate:i2t", "embed:t2i", "retrieve:t2i:0", "generate:t2i"}
    for name, pool in pools.items():
        assert pool["peak_actors"] >= 1 and pool["batches"] >= 1, name
        assert 0 < pool["busy_share"] <= 1 and sum(pool["actors_per_node"].values()) == pool["actors"], name
        # the measured cost per row, beside the declared one it can replace (resources.<pool>.seconds_per_row)
        assert pool["seconds_per_row"] == pytest.approx(pool["actor_seconds_busy"] / pool["rows"], rel=0.05, abs=0.01)
        assert pool["declared_seconds_per_row"] > 0
    assert summary["completed"] <= pools["generate:i2t"]["rows"] + pools["generate:t2i"]["rows"] <= summary["rows_out"]
    assert summary["bounded_by"] == max(pools, key=lambda p: pools[p]["busy_share"])



@pytest.mark.timeout(600)
def test_rerun_is_a_no_op_and_a_changed_config_is_refused(kb, bad_input_run):
    run = bad_input_run
    before = sorted(p.name for p in run.out.rglob("*.parquet"))
    again = run_job(JobSpec(data=str(run.data), kb=kb, out=str(run.out), cfg=JOB))
    # a finished run's rows (failed ones too) are not computed again: nothing doubles, nothing is written
    assert again["rows_out"] == run.summary["rows_out"] == again["unique_row_keys"]
    assert sorted(p.name for p in run.out.rglob("*.parquet")) == before
    changed = JOB.model_copy(update={"retrieval": JOB.retrieval.model_copy(update={"alpha": 0.9})})
    with pytest.raises(RunMismatch, match="config_hash"):
        run_job(JobSpec(data=str(run.data), kb=kb, out=str(run.out), cfg=changed))


@pytest.mark.timeout(600)
def test_retry_failed_recomputes_only_failed_rows_exactly_once(kb, bad_input_run, tmp_path):
    run = bad_input_run
    out = tmp_path / "out"
    shutil.copytree(run.out, out)  # the module's output stays as the job left it
    first = read_output(Storage(), str(out)).to_pandas()
    failed_before = set(first.loc[first.status == "failed", "row_key"])
    late = first.loc[first.id == "bad-missing-uri", "row_key"].item()
    assert late in failed_before
    if not run.missing.exists():
        run.missing.write_bytes(make_internal(1, seed=9).column("image")[0].as_py())  # the missing object shows up
    retried = run_job(JobSpec(data=str(run.data), kb=kb, out=str(out), cfg=JOB, retry_failed=True))
    after = read_output(Storage(), str(out)).to_pandas()
    assert len(after) == len(first) and after.row_key.is_unique  # each failed row replaced, none doubled
    # only the failed rows were computed again (an unreadable shard's row has nothing to retry)
    assert retried["rows_this_run"] == len({k for k in failed_before if ":error:" not in k})
    assert after.loc[after.row_key == late, "status"].item() == "completed"
    still = set(after.loc[after.status == "failed", "row_key"])
    assert still == failed_before - {late} and retried["failed"] == len(still)  # bad input fails again, alone
    unchanged = first[~first.row_key.isin(failed_before)].set_index("row_key")
    kept = after.set_index("row_key").loc[unchanged.index]
    assert (kept.status == unchanged.status).all() and (kept.text.fillna("") == unchanged.text.fillna("")).all()


def _manifest(n_shards: int) -> dict:
    """What the plan reads of a KB's manifest, for plans that never run."""
    from rag4dmc.actors.encoders import describe_encoder
    from rag4dmc.pipeline.config import EncoderConfig

    dims = describe_encoder(EncoderConfig())
    return {"config": {"encoder": EncoderConfig().model_dump(mode="json")}, "shards": list(range(n_shards)),
            "image_dim": dims["image_dim"], "text_dim": dims["text_dim"], "version": "v"}


def _chains(n_shards: int, cfg: JobConfig = JOB) -> dict:
    from rag4dmc.pipeline.job.mapper import DIRECTIONS, direction_stages

    return {task: direction_stages(task, cfg, "kb", _manifest(n_shards), None) for task, _ in DIRECTIONS}


def one_node(cpus: float, gpus: float = 0.0, memory_gb: float = 24.0):
    from rag4dmc.pipeline.job.scaling import capacity_of

    return capacity_of([{"CPU": cpus, "GPU": gpus, "memory": memory_gb * 1024**3}])


def test_actor_pools_leave_room_for_the_tasks_of_every_branch_on_two_cpus():
    from rag4dmc.actors.factory import encoder_class
    from rag4dmc.actors.preprocess import CPU_TASK
    from rag4dmc.pipeline.config import EncoderConfig
    from rag4dmc.pipeline.job.mapper import plan_resources, task_slots

    chains = _chains(2)
    pools = plan_resources(JOB, chains, has_gpu=False, capacity=one_node(cpus=2.0))
    assert {"retrieve:i2t:0", "retrieve:i2t:1", "retrieve:t2i:0", "retrieve:t2i:1"} <= set(pools)
    assert len(pools) == 2 * (1 + 2 + 1)  # embed, two retrieval shard groups, generate; per direction
    held = sum(p.num_cpus * p.min_actors for p in pools.values())
    reserved = (3 + task_slots(2)) * CPU_TASK.num_cpus  # a read per branch and the CPU tasks beside the pools
    assert 0 < held <= 2.0 - reserved + 1e-9
    roomy = plan_resources(JOB, _chains(1), has_gpu=False, capacity=one_node(cpus=64.0))
    assert roomy["embed:i2t"].num_cpus == encoder_class(EncoderConfig()).RESOURCES.num_cpus  # never scaled up


def test_a_cluster_with_no_cpu_left_for_the_pools_is_a_clear_error():
    from rag4dmc.pipeline.job.mapper import plan_resources

    with pytest.raises(ValueError, match="no CPUs left"):
        plan_resources(JOB, _chains(1), has_gpu=False, capacity=one_node(cpus=0.5))


@pytest.mark.timeout(900)
def test_a_three_shard_kb_chained_one_shard_per_actor_gives_the_in_process_chain_s_rows(ray_local, tmp_path):
    """Three retrieval pools per direction (first / middle / last shard group) on Ray: each row's neighbours and
    completion are the ones the same stages give in one process (``rag4dmc.pipeline.job.local_chain``)."""
    from rag4dmc.pipeline.config import IndexConfig
    from rag4dmc.pipeline.job.local_chain import LocalChain

    root = tmp_path / "kb-src"
    write_split(make_internal(150, seed=0).select(["id", "image", "text"]), f"{root}/internal")
    cfg3 = FAST_KB.model_copy(update={"index": IndexConfig(shards=3), "use_external": False})
    kb3 = str(tmp_path / "kb3")
    run_kb_build(KBBuildSpec(internal=f"{root}/internal", out=kb3, cfg=cfg3))
    data = tmp_path / "data"
    write_split(_incomplete(40, seed=7), data, 2)
    # no NIQE term: the rows compared are the retrieved ids and the chosen completion, the same either way
    job = JOB.model_copy(update={"shards_per_actor": 1, "selection": FLOW_SELECTION})
    summary = run_job(JobSpec(data=str(data), kb=kb3, out=str(tmp_path / "out"), cfg=job))
    assert summary["rows_out"] == summary["unique_row_keys"] == 40 and summary["failed"] == 0
    out = read_output(Storage(), str(tmp_path / "out")).to_pandas().set_index("row_key")

    local = LocalChain(kb3, job)
    assert len(local.manifest["shards"]) == 3
    completed = 0
    for shard in sorted(data.glob("*.parquet")):
        for row in local.shard(str(shard), str(data), batch_rows=64).to_pylist():
            if row["status"] != "completed":
                continue
            completed += 1
            distributed = out.loc[row["row_key"]]
            assert list(distributed.retrieved_ids) == row["retrieved_ids"] and distributed.status == "completed"
            assert distributed[row["generated"]] == row[row["generated"]]
    assert completed == summary["completed"] > 0


STALL_S = 8.0  # the planted stall of each embedding actor's first batch: past the time the job's reads take here


@pytest.mark.timeout(600)
def test_rows_in_flight_stay_within_the_configured_blocks_and_output_lands_per_block(kb, tmp_path, monkeypatch):
    """A limit of 12 blocks of 8 rows on 180 rows. Planted: each embedding actor's first batch stalls ``STALL_S``
    (a ``hang`` fault counted per process), so no completion is committed while the reads come in and the two
    directions' rows (about 144) pass the limit: reads must wait for room, whatever the machine's speed."""
    from rag4dmc.actors import faults

    data = tmp_path / "data"
    write_split(_incomplete(180, seed=8), data, 3)
    monkeypatch.setenv(faults.ENV, json.dumps([{"stage": "embed", "kind": "hang", "batch": 1, "seconds": STALL_S}]))
    small = StageResources(batch_size=8)
    cfg = JOB.model_copy(update={"block_rows": 8, "max_blocks_in_flight": 12, "selection": FLOW_SELECTION,
                                 "resources": {"embed": small, "retrieve": small, "generate": small}})
    summary = run_job(JobSpec(data=str(data), kb=kb, out=str(tmp_path / "out"), cfg=cfg))
    assert summary["rows_out"] == summary["unique_row_keys"] == 180 and summary["failed"] == 0
    flow = summary["in_flight"]
    assert flow["limit_rows"] == 96 and flow["floor_rows"] == 6 * 8 + 3 * 8  # a batch per pool, a block per branch
    assert flow["reads_held_back"] > 0 and flow["in_flight_rows"] == 0, flow  # the limit held reads back
    assert 0 < flow["peak_rows_in_flight"] <= max(96, 72 + flow["largest_read_rows"]) == flow["bound_rows"]
    assert flow["bound_rows"] < 180
    files = list((tmp_path / "out" / "data").glob("*/*.parquet"))
    assert len(files) >= 180 // 8  # committed as blocks finish, not at the end
    # Ray Data may bundle two small blocks into one actor call, so a file can hold more than one block, but
    # never more rows than were in flight
    assert max(pq.read_metadata(f).num_rows for f in files) <= flow["bound_rows"]


@pytest.mark.timeout(900)
def test_pools_slower_than_task_seconds_a_block_share_each_block_and_output_is_committed_in_whole_blocks(kb, tmp_path):
    data = tmp_path / "data"
    write_split(_incomplete(96, seed=9), data, 1)
    small = StageResources(batch_size=8)
    # declared costs: encoder 0.023 s/row, retrieval 0.008, image generator 0.05: a 32-row block is over 0.1 s,
    # so their tasks are one batch of 8; the text generator (0.0004 s/row) takes whole blocks
    cfg = JOB.model_copy(update={"block_rows": 32, "task_seconds": 0.1, "selection": FLOW_SELECTION,
                                 "resources": {"embed": small, "retrieve": small, "generate": small}})
    summary = run_job(JobSpec(data=str(data), kb=kb, out=str(tmp_path / "out"), cfg=cfg))
    assert summary["rows_out"] == summary["unique_row_keys"] == 96 and summary["failed"] == 0
    assert summary["in_flight"]["floor_rows"] == 6 * 8 + 5 * 32  # a batch per pool; 3 read splits, 2 merges
    rows = [pq.read_metadata(f).num_rows for f in (tmp_path / "out" / "data").glob("*/*.parquet")]
    assert sum(rows) == 96 and max(rows) > 8  # the 8-row tasks were merged again before commit


def test_a_limit_too_small_for_the_plan_s_batches_is_refused():
    from rag4dmc.pipeline.config import ConfigError
    from rag4dmc.pipeline.job.mapper import flow_limit, plan_resources

    chains = _chains(1)
    pools = plan_resources(JOB, chains, has_gpu=False, capacity=one_node(cpus=2.0))
    with pytest.raises(ConfigError, match="max_blocks_in_flight"):
        flow_limit(JOB.model_copy(update={"max_blocks_in_flight": 1}), chains, pools)
    assert flow_limit(JOB, chains, pools) >= sum(p.batch_size for p in pools.values()) + JOB.block_rows
