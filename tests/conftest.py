"""Shared fixtures: an S3 server on loopback (moto), a fresh bucket per test, and a local Ray instance.

Nothing here reaches the network: model hubs are forced offline and S3 is served by moto on 127.0.0.1.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rag4dmc.pipeline.config import StorageConfig

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"

LOOPBACK = "127.0.0.1"
S3_REGION = "us-east-1"
S3_TEST_CREDENTIAL = "testing"
RAY_NUM_CPUS = 2
RAY_OBJECT_STORE_BYTES = 500 * 1024**2
# Ray keeps idle task workers up to num_workers_soft_limit (default: the CPUs, 2 here) and kills the rest after a
# second idle: every job of the session would start its read, decode and finalize workers again (a Python process
# importing Ray, pyarrow and numpy each). A session of many small jobs keeps them (each ~150 MiB).
RAY_WORKERS_KEPT = 12
REPO_ROOT = Path(__file__).resolve().parents[1]


# Fixtures that start Ray (the session's, or a cluster of a test's own): a test that uses one is marked ``slow`` (a test
# that starts Ray in a process of its own is marked by hand), so that ``make test-quick`` (pytest -m "not slow") is
# the inner loop of everything else. CI runs every test.
RAY_FIXTURES = ("ray_local", "kb", "ray_head", "emoji_kb")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if any(name in RAY_FIXTURES for name in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@dataclass(frozen=True)
class S3Server:
    """A moto S3 server: its endpoint, and the matching ``StorageConfig`` and fsspec options."""

    endpoint_url: str
    storage_config: StorageConfig
    storage_options: dict


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto in server mode on loopback (a free port), for s3fs/botocore over real HTTP."""
    from moto.server import ThreadedMotoServer

    no_proxy = os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or ""
    os.environ["NO_PROXY"] = ",".join(filter(None, [no_proxy, LOOPBACK]))  # no proxy between us and moto
    server = ThreadedMotoServer(ip_address=LOOPBACK, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    config = StorageConfig(endpoint_url=f"http://{host}:{port}", key=S3_TEST_CREDENTIAL,
                           secret=S3_TEST_CREDENTIAL, region=S3_REGION, retries=1)
    try:
        yield S3Server(config.endpoint_url, config, config.fsspec_options())
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A fresh, empty bucket on the moto server; yields ``s3://<bucket>``, removed with its objects afterwards."""
    import boto3
    import s3fs

    cfg = s3_server.storage_config
    client = boto3.client("s3", endpoint_url=cfg.endpoint_url, region_name=cfg.region,
                          aws_access_key_id=cfg.key, aws_secret_access_key=cfg.secret)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    try:
        yield f"s3://{bucket}"
    finally:
        s3fs.S3FileSystem(skip_instance_cache=True, **s3_server.storage_options).rm(bucket, recursive=True)


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One local Ray instance for the session (2 CPUs, small object store, no dashboard); yields ``ray``."""
    import ray

    from bench.common import start_local_ray, worker_pythonpath

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", worker_pythonpath())  # the session's own setting again after it
        start_local_ray(RAY_NUM_CPUS, str(tmp_path_factory.mktemp("ray")), RAY_OBJECT_STORE_BYTES, RAY_WORKERS_KEPT)
        try:
            yield ray
        finally:
            ray.shutdown()


@pytest.fixture(scope="session")
def kb(ray_local, tmp_path_factory) -> str:
    """The jobs' small KB (``tests.test_job.build_job_kb``: generated pairs, lite encoder, no calibration), built
    once for the session; tests only read it. A module that needs another KB defines its own ``kb``."""
    from tests.test_job import build_job_kb

    return build_job_kb(tmp_path_factory.mktemp("kb"))


EMOJI_TEST_GROUPS = ["Animals & Nature", "Food & Drink", "Travel & Places"]  # ~500 emoji, three labels


@pytest.fixture(scope="session")
def emoji_corpus():
    """Real image-text pairs nobody here made: Noto Color Emoji drawings named by Unicode (bench/emoji.py),
    three groups of them, with the group as label. Needs Debian's fonts-noto-color-emoji and unicode-data
    (``make test`` installs them)."""
    from bench.emoji import emoji_pairs

    return emoji_pairs(groups=EMOJI_TEST_GROUPS)


FLAT_KB_IMAGES = 12  # blank stickers and white cards planted among the emoji KB's images: NIQE is undefined on them


def _flat(kind: int) -> bytes:
    import io

    from PIL import Image

    img = Image.new("RGBA", (128, 128), (0, 0, 0, 0)) if kind % 2 else Image.new("RGB", (200, 160), "white")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def emoji_split(emoji_corpus, tmp_path_factory):
    """The emoji corpus split as a user's corpus is (``bench.emoji.split_corpus``): internal pairs (two groups,
    with ``FLAT_KB_IMAGES`` flat images planted), external pairs (the third group) and incomplete rows, each
    written as one parquet file; ``(tables, paths, root folder)``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench.emoji import split_corpus

    parts = split_corpus(emoji_corpus, EMOJI_TEST_GROUPS[:2], EMOJI_TEST_GROUPS[2:], internal_fraction=0.45,
                         incomplete_fraction=0.2, seed=1)
    flat = pa.table({"id": [f"flat{i}" for i in range(FLAT_KB_IMAGES)],
                     "image": [_flat(i) for i in range(FLAT_KB_IMAGES)],
                     "text": ["blank sticker" if i % 2 else "white card" for i in range(FLAT_KB_IMAGES)],
                     "label": ["none"] * FLAT_KB_IMAGES})
    parts["internal"] = pa.concat_tables([parts["internal"], flat])
    root = tmp_path_factory.mktemp("emoji")
    paths = {}
    for name, table in parts.items():
        paths[name] = str(root / f"{name}.parquet")
        pq.write_table(table, paths[name])
    return parts, paths, root


@pytest.fixture(scope="session")
def emoji_kb(ray_local, emoji_split) -> tuple[str, dict]:
    """``rag4dmc kb build`` with the defaults (calibration and NIQE on) on the emoji split, built once for the
    session: ``(its URI, what the build returned)``. tests/test_real_data.py checks the build; the Serve tests
    serve it (a calibrated KB: the served settings are the KB's)."""
    from rag4dmc.pipeline.job.kb_runner import KBBuildSpec, run_kb_build

    _, paths, root = emoji_split
    built = run_kb_build(KBBuildSpec(internal=paths["internal"], external=paths["external"], out=str(root / "kb")))
    return str(root / "kb"), built


@pytest.fixture
def ast_builds(monkeypatch) -> list:
    """Every Python AST built in this process during the test (``compile`` to or from an AST: ``ast.parse``,
    ``ast.literal_eval`` on a string), as (thread name, filename): the rule that no rag4dmc thread builds one
    (CPython gh-106905, tests/test_threads.py) is checked against it. A probe in another thread shows it records."""
    import ast
    import builtins
    import threading

    built: list[tuple[str, str]] = []
    real_compile = builtins.compile

    def compile(source, filename, mode, flags=0, *args, **kwargs):
        if flags & ast.PyCF_ONLY_AST or isinstance(source, ast.AST):
            built.append((threading.current_thread().name, str(filename)))
        return real_compile(source, filename, mode, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "compile", compile)
    probe = threading.Thread(target=ast.literal_eval, args=("{'planted': 1}",), name="ast-probe")
    probe.start()
    probe.join()
    assert built == [("ast-probe", "<unknown>")]  # the recorder sees an AST built in another thread
    built.clear()
    return built


def off_main_thread(built: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The ASTs of ``ast_builds`` built outside the main thread."""
    import threading

    return [b for b in built if b[0] != threading.main_thread().name]


@pytest.fixture
def network_attempts(monkeypatch) -> list:
    """Every outgoing connection a test's code attempts (``socket.connect``), each refused and recorded: a test
    that must not touch the network asserts the list stays empty (a behaviour, where a timer would flake)."""
    import socket

    attempts: list = []

    def connect(self, address):
        attempts.append(address)
        raise OSError(f"network disabled by the test (connect to {address})")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, address: connect(self, address))
    return attempts
