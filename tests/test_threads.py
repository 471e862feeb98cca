"""No Python AST is built outside the main thread (CPython gh-106905).

On Python 3.11 before 3.11.8, two threads of one process that build ASTs at once (``ast.parse``,
``ast.literal_eval`` on a string, ``compile`` to or from an AST) can corrupt a shared counter and raise
``SystemError: AST constructor recursion depth mismatch``. The rule rag4dmc keeps on every Python it supports
(``requires-python`` in pyproject.toml): its threads build no ASTs. Its threads are a stage's batch thread (each
``process`` call under ``batch_timeout_s``, ``rag4dmc.actors.stage``), the embedding layout's reader pool
(``rag4dmc.pipeline.io.embedding_layout``: tests/test_layout.py reads a layout with ``ast`` made to fail) and the
rerank pool of the index (tests/test_index.py runs it under the same recorder).

Here the job's stages with the defaults (lite encoders, NIQE on) complete real rows in this process, each batch
in its batch thread, while every AST built anywhere in the process is recorded with its thread.
"""

from __future__ import annotations

import threading

from rag4dmc.pipeline.demo.corpus import write_split
from tests.conftest import off_main_thread
from tests.test_job import JOB, _incomplete


def test_the_jobs_stages_build_no_ast_outside_the_main_thread(kb, tmp_path, monkeypatch, ast_builds):
    from rag4dmc.pipeline.job.local_chain import LocalChain

    assert JOB.batch_timeout_s is not None  # so each stage's call runs in its batch thread
    data = tmp_path / "data"
    write_split(_incomplete(24, seed=5), data, 1)
    chain = LocalChain(kb, JOB)  # models and KB shards load here, in the main thread, as in an actor's setup
    ran_in: set[str] = set()  # the threads each stage's process calls ran in
    for stages in chain.chains.values():
        for stage in stages:
            def process(rows, _process=stage.process):
                ran_in.add(threading.current_thread().name)
                return _process(rows)

            monkeypatch.setattr(stage, "process", process)
    (shard,) = sorted(data.glob("*.parquet"))
    out = chain.shard(str(shard), str(data), batch_rows=8)
    assert set(out.column("status").to_pylist()) == {"observed", "completed"}
    assert {"embed-batch", "retrieve-batch", "generate-batch"} <= ran_in  # the calls ran in batch threads
    assert off_main_thread(ast_builds) == []
