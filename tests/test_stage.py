"""The stage contract: what a stage may touch, how a failure stays in its rows, and the plan-time chain check;
then the job's whole chain, in one process, over a three-shard knowledge base."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from rag4dmc.actors.stage import ChainError, Column, Produced, Stage, apply, check_chain, run_chain
from rag4dmc.pipeline.config import CalibrationConfig, IndexConfig, JobConfig, KBConfig, MappingConfig
from rag4dmc.pipeline.schema import INPUT_SCHEMA, TASK_FAILED, TASK_I2T, TASK_OBSERVED, TASK_T2I


def _objects(values) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _batch(tasks: list[str], values: list[float]) -> dict[str, np.ndarray]:
    n = len(tasks)
    return {"row_key": _objects([f"s:{i}" for i in range(n)]), "task": _objects(tasks),
            "error": _objects([""] * n), "v": np.asarray(values, np.float64)}


class Square(Stage):
    """Writes v**2 for i2t rows; raises on a negative value (a poisoned row)."""

    name, accounts = "square", "embed"
    tasks = (TASK_I2T,)
    reads = ("v",)
    writes = (Column("sq", -1.0, np.float64), Column("note"))
    drops = ("v",)

    def __init__(self):
        self.calls = 0

    def process(self, rows):
        self.calls += 1
        v = rows["v"]
        if (v < 0).any():
            raise ValueError(f"negative value {v[v < 0][0]}")
        errors = ["too big" if x > 100 else None for x in v]
        return Produced({"sq": v**2, "note": [f"from {x:g}" for x in v]}, errors)


def test_a_stage_touches_only_its_rows_and_creates_new_arrays():
    batch = _batch([TASK_I2T, TASK_T2I, TASK_I2T, TASK_OBSERVED, TASK_FAILED], [2, 3, 4, 5, 6])
    before = {k: v.copy() for k, v in batch.items()}
    out = apply(Square(), batch)
    assert list(out["sq"]) == [4, -1, 16, -1, -1]  # declared fill where the stage did not run
    assert list(out["note"]) == ["from 2", None, "from 4", None, None]
    assert "v" not in out  # dropped: no later stage reads it
    assert out["seconds_embed"][[1, 3, 4]].tolist() == [0, 0, 0] and (out["seconds_embed"][[0, 2]] >= 0).all()
    for k, v in before.items():  # nothing the stage did not create was modified
        np.testing.assert_array_equal(batch[k], v)


def test_a_stage_keeps_values_an_earlier_stage_wrote_for_other_rows():
    batch = {**_batch([TASK_T2I, TASK_I2T], [1, 7]), "sq": np.array([9.0, 0.0])}
    out = apply(Square(), batch)
    assert list(out["sq"]) == [9.0, 49.0]


def test_an_exception_fails_only_the_rows_it_came_from_with_the_reason():
    stage = Square()
    out = apply(stage, _batch([TASK_I2T, TASK_I2T, TASK_T2I, TASK_I2T], [2, -3, -4, 5]))
    assert list(out["task"]) == [TASK_I2T, TASK_FAILED, TASK_T2I, TASK_I2T]
    assert "square failed: ValueError: negative value -3" in out["error"][1]
    assert list(out["sq"]) == [4, -1, -1, 25]  # the others were computed, one by one
    assert stage.calls == 1 + 3  # the batch, then each of its three rows


def test_a_row_the_stage_reports_as_failed_says_why():
    out = apply(Square(), _batch([TASK_I2T, TASK_I2T], [3, 200]))
    assert list(out["task"]) == [TASK_I2T, TASK_FAILED] and out["error"][1] == "too big"


class Needs(Stage):
    def __init__(self, reads, writes=(), drops=()):
        self.reads, self.writes, self.drops = reads, tuple(Column(w) for w in writes), drops


def test_the_chain_check_names_the_missing_column_and_who_writes_it_too_late():
    check_chain([Needs(("text",), ["a"]), Needs(("a",), ["b"])], source=["text"])
    with pytest.raises(ChainError, match=r"reads \['a'\].*writes it but runs later"):
        check_chain([Needs(("a",), ["b"]), Needs(("text",), ["a"])], source=["text"])
    with pytest.raises(ChainError, match=r"reads \['a'\]"):  # dropped upstream
        check_chain([Needs((), ["a"]), Needs(("a",), drops=("a",)), Needs(("a",))], source=[])


def _manifest(n_shards: int) -> dict:
    from rag4dmc.actors.encoders import describe_encoder
    from rag4dmc.pipeline.config import EncoderConfig

    dims = describe_encoder(EncoderConfig())
    return {"config": {"encoder": EncoderConfig().model_dump(mode="json")}, "shards": list(range(n_shards)),
            "image_dim": dims["image_dim"], "text_dim": dims["text_dim"], "version": "v"}


@pytest.mark.parametrize("task", [TASK_I2T, TASK_T2I])
def test_the_job_s_chains_pass_the_check_and_a_reordered_one_fails_it(task):
    from rag4dmc.actors.retrieve import RetrieveNeighbours
    from rag4dmc.pipeline.job.mapper import check_stages, direction_stages

    stages = direction_stages(task, JobConfig(shards_per_actor=1), "kb", _manifest(3), None)
    check_stages(stages)
    roles = [s.role for s in stages if isinstance(s, RetrieveNeighbours)]
    assert roles == ["first", "middle", "last"]
    with pytest.raises(ChainError, match="query"):  # retrieval before the embedding
        check_stages([stages[0], stages[2], stages[1], *stages[3:]])
    with pytest.raises(ChainError, match="pseudo"):  # a middle shard group with no first one before it
        check_stages([stages[0], stages[1], stages[3], stages[4], stages[5]])
    with pytest.raises(ChainError, match="ret_ids"):  # completion before the last shard group ranked
        check_stages([*stages[:4], stages[5]])


# ------------------------------------------------------------------------------ the whole chain, Ray-free


@pytest.fixture(scope="module")
def three_shard_kb(tmp_path_factory):
    """A KB of 160 demo pairs embedded by the KB build's own stages (in process), saved in three shards."""
    from rag4dmc.actors.embed import EmbedPairs
    from rag4dmc.actors.encoders import encoder_image_size
    from rag4dmc.actors.preprocess import FetchAndDecode
    from rag4dmc.pipeline.config import EncoderConfig
    from rag4dmc.pipeline.demo.corpus import make_internal
    from rag4dmc.pipeline.io.datasets import ShardResult
    from rag4dmc.pipeline.job.reader import keyed_rows
    from rag4dmc.pipeline.kb.in_memory import build_knowledge_base

    enc = EncoderConfig()
    pairs = make_internal(160, seed=0).select(["id", "image", "text"])
    rows = _canonical(pairs)
    embedded = run_chain([FetchAndDecode(encoder_image_size(enc), enc.max_image_pixels, tasks=(TASK_OBSERVED,)),
                          EmbedPairs(enc)], _as_batch(keyed_rows("kb", ShardResult(rows, []), "")))
    vectors = {"image": embedded["image_emb"], "text": embedded["text_emb"]}
    cfg = KBConfig(mapping=MappingConfig(max_epochs=20, hidden_dim=128), index=IndexConfig(shards=3),
                   calibration=CalibrationConfig(enabled=False), use_external=False)
    from rag4dmc.actors.encoders import describe_encoder

    out = str(tmp_path_factory.mktemp("kb3") / "kb")
    build_knowledge_base(pairs, vectors, cfg=cfg, encoder_info=describe_encoder(enc), out=out)
    return out


def _canonical(table: pa.Table) -> pa.Table:
    """Rows in the datasets' canonical shape (what ``datasets.read_shard`` returns)."""
    n = table.num_rows
    return pa.table({"id": table.column("id"), "image": table.column("image"),
                     "image_uri": pa.array([None] * n, pa.string()), "text": table.column("text"),
                     "input_error": pa.array([None] * n, pa.string())})


def _as_batch(table: pa.Table) -> dict[str, np.ndarray]:
    return {name: _objects(table.column(name).to_pylist()) for name in table.column_names}


def test_the_whole_chain_over_three_shard_groups_equals_one_shard_retrieval(three_shard_kb):
    from rag4dmc.pipeline.core.retrieval import retrieve
    from rag4dmc.pipeline.demo.corpus import make_incomplete
    from rag4dmc.pipeline.io.datasets import ShardResult
    from rag4dmc.pipeline.job.mapper import direction_stages
    from rag4dmc.pipeline.job.reader import keyed_rows
    from rag4dmc.pipeline.kb import store as kb_store

    kb = kb_store.load(three_shard_kb)
    assert len(kb.shards) == 3
    queries = make_incomplete(40, seed=3, missing_rate=1.0).select(["id", "image", "text"])
    batch = _as_batch(keyed_rows("in", ShardResult(_canonical(queries), []), ""))
    tasks = set(batch["task"])
    assert {TASK_I2T, TASK_T2I} <= tasks
    entry_ids = np.asarray(kb.entries.column("id").to_pylist(), dtype=object)
    all_vectors = {m: np.concatenate([s.vectors(m) for s in kb.shards]) for m in ("image", "text")}
    for task, observed in ((TASK_I2T, "image"), (TASK_T2I, "text")):
        chained = direction_stages(task, JobConfig(shards_per_actor=1), three_shard_kb, kb.manifest, None)
        single = direction_stages(task, JobConfig(shards_per_actor=3), three_shard_kb, kb.manifest, None)
        assert len(chained) == len(single) + 2
        out = run_chain(chained, batch)
        rows = np.flatnonzero(batch["task"] == task)
        assert all(out["status"][i] == "completed" for i in rows), [out["error"][i] for i in rows]
        # the expected neighbours: one search over every KB row at once
        query = run_chain(chained[:2], batch)["query"][rows]
        cfg = chained[2].cfg
        other = "text" if observed == "image" else "image"
        want = retrieve(query, kb.pseudo(query, observed), all_vectors[observed], all_vectors[other], cfg)
        for r, i in enumerate(rows):
            assert out["retrieved_ids"][i] == list(entry_ids[want.ids[r][want.ids[r] >= 0]])
        # the KB's vectors are float16: the stage and this search round their float32 products differently
        np.testing.assert_allclose(np.stack([out["fusion_scores"][i] for i in rows]), want.fused, atol=1e-4)
        again = run_chain(single, batch)  # one stage holding the three shards: the same completions
        generated = "text" if task == TASK_I2T else "image"
        assert [again[generated][i] for i in rows] == [out[generated][i] for i in rows]
        others = np.flatnonzero(batch["task"] != task)  # rows of the other direction are left as they were
        assert all(out["status"][i] is None for i in others)
    assert set(INPUT_SCHEMA.names) <= set(batch)


def test_the_modules_a_cpu_task_worker_imports_load_no_model_library():
    """Ray Data's read, decode, text-check, finalize and commit tasks run in worker processes that import only
    what those functions and stages live in. None of it may pull in torch or FAISS: on a small machine every
    fresh task worker would pay seconds of CPU and most of a GB for them (the plan's modules do)."""
    import subprocess
    import sys

    modules = ["rag4dmc.actors.stage", "rag4dmc.actors.preprocess", "rag4dmc.pipeline.job.reader", "rag4dmc.pipeline.job.writer", "rag4dmc.pipeline.job.in_flight"]
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nprint(sorted({{'torch', 'faiss'}} & set(sys.modules)))"
    heavy = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert heavy.stdout.strip() == "[]"
    from rag4dmc.actors.stage import run_stage
    from rag4dmc.pipeline.job.writer import finalize

    assert run_stage.__module__ == "rag4dmc.actors.stage" and finalize.__module__ == "rag4dmc.pipeline.job.writer"


def test_retrieval_and_nearest_neighbour_generation_never_import_torch(three_shard_kb, tmp_path):
    """A retrieval actor and a nearest-neighbour generator (the defaults on CPU) load no model: unpickled in a fresh
    process as Ray ships them to their actors and run on embedded rows, they never import torch (about 2 s of CPU
    for every actor a job starts), the image -> text direction's selection (cosine + BLEU) included."""
    import json
    import pickle
    import subprocess
    import sys

    from rag4dmc.pipeline.demo.corpus import make_incomplete
    from rag4dmc.pipeline.io.datasets import ShardResult
    from rag4dmc.pipeline.job.mapper import direction_stages
    from rag4dmc.pipeline.job.reader import keyed_rows
    from rag4dmc.pipeline.kb import store as kb_store

    manifest = kb_store.load(three_shard_kb, shards=[]).manifest
    stages = direction_stages(TASK_I2T, JobConfig(shards_per_actor=1), three_shard_kb, manifest, None)
    queries = make_incomplete(12, seed=5, missing_rate=1.0).select(["id", "image", "text"])
    batch = run_chain(stages[:2], _as_batch(keyed_rows("in", ShardResult(_canonical(queries), []), "")))
    assert (batch["task"] == TASK_I2T).any()
    (tmp_path / "work.pkl").write_bytes(pickle.dumps((stages[2:], batch)))
    code = ("import json, pickle, sys\nfrom rag4dmc.actors.stage import run_chain\n"
            f"stages, batch = pickle.loads(open({str(tmp_path / 'work.pkl')!r}, 'rb').read())\n"
            "out = run_chain(stages, batch)\n"
            "print(json.dumps({'statuses': [s for s, t in zip(out['status'], batch['task']) if t == 'i2t'],\n"
            "                  'torch': 'torch' in sys.modules}))")
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    result = json.loads(ran.stdout.strip().splitlines()[-1])
    assert result["statuses"] == ["completed"] * int((batch["task"] == TASK_I2T).sum())
    assert result["torch"] is False


def test_a_jobs_driver_and_the_services_app_import_no_torch():
    """The plan of ``rag4dmc complete`` and the Serve application only read a KB's calibration
    (``rag4dmc.pipeline.kb.settings``): their processes do not pay the calibration's torch (about 2 s of CPU and
    300 MiB at every start of a job's driver)."""
    import json
    import subprocess
    import sys

    code = ("import json, sys\nimport rag4dmc.pipeline.job.runner, rag4dmc.pipeline.job.mapper, rag4dmc.deploy.app\n"
            "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'diffusers', 'pyiqa') if m in sys.modules)))")
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert json.loads(ran.stdout.strip().splitlines()[-1]) == []
