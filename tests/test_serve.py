"""The completion service (deploy/). The request rules as pure functions first; then the Ray Serve
application on the session's local Ray (2 CPUs), over real HTTP on loopback: good requests answered with
the batch job's provenance, bad ones refused with a status and a JSON message, and a concurrent burst of
distinct requests that is batched and still answers each request with its own result.

The service serves the session's emoji KB (``tests/conftest.py``: real clip art, ``kb build`` with the defaults,
so calibrated: the served settings are the KB's), queried with generated scenes; the fault and signal tests
serve the jobs' KB. Generation is the offline nearest-neighbour generator, so every answer is deterministic and
checkable.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from pydantic import SecretStr

from rag4dmc.actors.images import load_image
from rag4dmc.deploy.app import APP_NAME, build_app
from rag4dmc.deploy.deployments import COMPLETE_PATH, DEPLOYMENTS, HEALTH_PATH
from rag4dmc.deploy.protocol import (
    API_KEY_HEADER,
    MAX_ID_CHARS,
    CompletionRequest,
    RequestError,
    answer,
    check_api_key,
    check_declared_length,
    parse_request,
    prepare_query,
    read_body,
)
from rag4dmc.pipeline.config import ConfigError, JobConfig, ServeConfig, validate
from tests.conftest import LOOPBACK
from tests.processes import until

REPO = Path(__file__).resolve().parents[1]
SERVE_CONFIG = REPO / "deploy" / "serve_config.yaml"
API_KEY = "test-key-123"
MAX_TEXT = 200
MAX_UPLOAD = 64 * 1024  # small, so an oversized body is cheap to send (and fits the socket buffers)
HTTP_TIMEOUT_S = 120  # one request, the first ones included (replicas warm up)
BURST = 12  # concurrent requests: 6 images and 6 texts, all distinct
BURST_TIMEOUT_S = 180


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


PNG = _png(Image.new("RGB", (40, 30), (200, 20, 20)))


def _parse(content_type: str | None, body: bytes) -> CompletionRequest:
    return parse_request(content_type, body, max_text_chars=MAX_TEXT)


def _multipart(fields) -> tuple[str, bytes]:
    """Content-Type and body of a multipart/form-data request as the requests library builds it."""
    import requests

    req = requests.Request("POST", "http://localhost/", files=fields).prepare()
    return req.headers["Content-Type"], req.body


# -------------------------------------------------------------------------------------------- request rules


def test_json_and_multipart_requests_parse_to_one_modality():
    text = _parse("application/json; charset=utf-8", json.dumps({"text": "  two red circles  ", "id": "a"}).encode())
    assert (text.id, text.text, text.image, text.task) == ("a", "two red circles", None, "t2i")
    b64 = base64.b64encode(PNG).decode()
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))  # MIME-style line breaks
    for value in (b64, wrapped, f"data:image/png;base64,{b64}"):
        image = _parse("application/json", json.dumps({"image": value}).encode())
        assert image.image == PNG and image.text is None and image.task == "i2t" and len(image.id) == 32
    # an empty or null other modality means "missing", as in the job
    assert _parse("application/json", json.dumps({"image": b64, "text": ""}).encode()).task == "i2t"
    assert _parse("application/json", json.dumps({"image": None, "text": "x"}).encode()).task == "t2i"
    binary = PNG + b"\r\n--\r\n\n\r"  # bytes that look like multipart delimiters survive
    content_type, body = _multipart({"image": ("photo.png", binary, "image/png"), "id": (None, "m-1")})
    assert _parse(content_type, body) == CompletionRequest(id="m-1", image=binary)
    content_type, body = _multipart({"text": (None, "ünïcode caption".encode())})
    assert _parse(content_type, body).text == "ünïcode caption"


@pytest.mark.parametrize(("content_type", "body", "status", "phrase"), [
    ("application/json", b"", 400, "no body"),
    ("application/json", b'{"text": "a", "image": "aGk="}', 400, "both an image and a text"),
    ("application/json", b'{"text": "   "}', 400, "neither"),
    ("application/json", b'{"id": "x"}', 400, "neither"),
    ("application/json", b'{"text": "a", "caption": "b"}', 400, "unknown field.*'caption'"),
    ("application/json", b'{"text": 3}', 400, "text must be a string"),
    ("application/json", b'{"image": 3}', 400, "base64 string"),
    ("application/json", b'{"image": "not base64!"}', 400, "not valid base64"),
    ("application/json", b"[1, 2]", 400, "not an object"),
    ("application/json", b"{not json", 400, "not valid JSON"),
    ("application/json", json.dumps({"text": "x" * (MAX_TEXT + 1)}).encode(), 400, "over the limit"),
    ("application/json", json.dumps({"text": "x", "id": "i" * (MAX_ID_CHARS + 1)}).encode(), 400, "id must be"),
    ("application/json", json.dumps({"text": "x", "min_confidence": 1.5}).encode(), 400, "min_confidence must"),
    ("application/json", json.dumps({"text": "x", "min_confidence": "high"}).encode(), 400, "min_confidence must"),
    ("text/plain", b"two red circles", 415, "text/plain"),
    (None, b'{"text": "a"}', 415, "no Content-Type"),
    ("multipart/form-data", b"--x\r\n\r\nhello", 400, "multipart"),
])
def test_bad_requests_are_refused_saying_what_to_do(content_type, body, status, phrase):
    with pytest.raises(RequestError, match=phrase) as err:
        _parse(content_type, body)
    assert err.value.status == status and err.value.hint
    assert set(err.value.body()) == {"error", "hint"}


def test_multipart_refuses_repeated_and_unknown_fields():
    content_type, body = _multipart({"image": ("a.png", PNG, "image/png"), "text": (None, "x")})
    with pytest.raises(RequestError, match="both"):
        _parse(content_type, body)
    content_type, body = _multipart({"picture": ("a.png", PNG, "image/png")})
    with pytest.raises(RequestError, match="'picture'"):
        _parse(content_type, body)
    content_type, body = _multipart([("text", (None, "a")), ("text", (None, "b"))])
    with pytest.raises(RequestError, match="more than once"):
        _parse(content_type, body)


def test_api_key_and_body_limits():
    check_api_key(None, None)  # no key configured: open
    check_api_key(API_KEY, SecretStr(API_KEY))
    for sent, phrase in ((None, "missing"), ("", "missing"), ("wrong", "wrong")):
        with pytest.raises(RequestError, match=phrase) as err:
            check_api_key(sent, SecretStr(API_KEY))
        assert err.value.status == 401
    check_declared_length(None, 10)
    check_declared_length("10", 10)
    with pytest.raises(RequestError) as err:
        check_declared_length("11", 10)
    assert err.value.status == 413 and "max_upload_bytes" in err.value.hint
    with pytest.raises(RequestError, match="not a number"):
        check_declared_length("ten", 10)

    async def chunks(*parts: bytes):
        for p in parts:
            yield p

    assert asyncio.run(read_body(chunks(b"abc", b"def"), 6)) == b"abcdef"
    with pytest.raises(RequestError) as err:  # a body longer than declared (or undeclared) is cut off too
        asyncio.run(read_body(chunks(b"abc", b"defg"), 6))
    assert err.value.status == 413


def test_images_are_decoded_with_the_jobs_guards():
    query = prepare_query(CompletionRequest(id="a", image=PNG), image_size=32, max_pixels=10_000)
    assert query.modality == "image" and query.pixels.shape == (32, 32, 3) and query.pixels.dtype == np.uint8
    assert prepare_query(CompletionRequest(id="b", text="hi"), image_size=32, max_pixels=1).text == "hi"
    for data, phrase in ((b"this is not an image", "could not be decoded"), (PNG, "over the limit")):
        with pytest.raises(RequestError, match=phrase) as err:
            prepare_query(CompletionRequest(id="c", image=data), image_size=32, max_pixels=1_000)
        assert err.value.status == 400


def test_answers_carry_the_job_row_and_422_for_a_failed_row():
    row = {"id": "a", "status": "completed", "error": None, "generated": "image", "text": "t", "image": PNG,
           "generator": "nn-consensus-retrieval", "retrieved_ids": ["k1"], "fusion_scores": [0.5],
           "candidates": None, "candidate_ids": ["e1"], "candidate_scores": [0.4], "chosen": 0, "settings": None, "kb_version": "v", "config_hash": "h",
           "seconds_embed": 0.1, "seconds_retrieve": 0.2, "seconds_generate": 0.3}
    status, body = answer(row, image_format="png", batch_sizes={"embed": 2, "retrieve": 2, "generate": 1})
    assert status == 200 and base64.b64decode(body["image"]) == PNG and body["image_format"] == "png"
    assert body["seconds"] == {"embed": 0.1, "retrieve": 0.2, "generate": 0.3} and body["batch_sizes"]["embed"] == 2
    status, body = answer(dict(row, generated="text", image=PNG), image_format="png", batch_sizes={})
    assert status == 200 and body["image"] is None  # the input image is not echoed back
    status, body = answer(dict(row, status="failed", error="no neighbours", generated=None), image_format="png",
                          batch_sizes={})
    assert status == 422 and body["error"] == "no neighbours" and body["hint"]


# ---------------------------------------------------------------------------------- configuration and CLI


def test_serve_config_validates_and_shares_the_jobs_config_hash():
    cfg = validate({"kb": "kb", "retrieval": {"alpha": 0.3}, "selection": {"image_quality": "none"}}, ServeConfig)
    job = JobConfig.model_validate({"retrieval": {"alpha": 0.3}, "selection": {"image_quality": "none"}})
    assert cfg.job_config().config_hash() == job.config_hash()
    assert cfg.job_config().config_hash() != JobConfig().config_hash()
    for bad, key in (({}, "kb"), ({"kb": "k", "max_upload_byte": 1}, "max_upload_byte"),
                     ({"kb": "k", "resources": {"rerank": {}}}, "resources.rerank")):
        with pytest.raises(ConfigError, match=key):
            validate(bad, ServeConfig)
    assert API_KEY not in repr(validate({"kb": "k", "api_key": API_KEY}, ServeConfig))


def test_cli_serve_builds_the_config_from_flags_and_environment(monkeypatch):
    import rag4dmc.deploy.local
    from rag4dmc.pipeline import cli

    seen = {}
    monkeypatch.setattr(rag4dmc.deploy.local, "run_local", lambda cfg, host, port: seen.update(cfg=cfg, host=host, port=port))
    monkeypatch.setenv(cli.API_KEY_ENV, "from-env")
    assert cli.main(["serve", "--kb", "some/kb", "--alpha", "0.25", "--max-upload-bytes", "1000", "--port", "9"]) == 0
    cfg = seen["cfg"]
    assert (cfg.kb, cfg.retrieval.alpha, cfg.max_upload_bytes) == ("some/kb", 0.25, 1000)
    assert cfg.api_key.get_secret_value() == "from-env" and (seen["host"], seen["port"]) == ("127.0.0.1", 9)
    assert cli.main(["serve", "--kb", "k", "--api-key", "flag"]) == 0
    assert seen["cfg"].api_key.get_secret_value() == "flag"
    assert cli.main(["serve", "--alpha", "2"]) == 2  # no kb, alpha out of range: refused with the keys named


def test_replicas_are_sized_from_the_actor_declarations():
    from rag4dmc.actors.encoders import LiteEncoder
    from rag4dmc.actors.generators import Blip2TextGenerator
    from rag4dmc.deploy.app import deployment_options, replica_resources
    from rag4dmc.pipeline.config import ServeConfig, StageResources
    from rag4dmc.pipeline.job.scaling import capacity_of

    def sized(declared, override=None, use_gpus=False, capacity=None):
        return replica_resources({"generate:i2t": declared}, {"generate": override}, use_gpus, capacity)["generate:i2t"]

    cfg = ServeConfig(kb="unused", upscale_delay_s=5)
    opts, batch = deployment_options(sized(LiteEncoder.RESOURCES), cfg)
    assert opts["autoscaling_config"]["upscale_delay_s"] == 5  # the configured delays, Serve's defaults otherwise
    assert opts["autoscaling_config"]["downscale_delay_s"] == ServeConfig(kb="unused").downscale_delay_s == 600
    assert opts["ray_actor_options"] == LiteEncoder.RESOURCES.serve_options()
    assert batch == LiteEncoder.RESOURCES.batch_size and opts["max_ongoing_requests"] > batch
    assert opts["autoscaling_config"]["max_replicas"] == 1  # no cluster read: its least size
    declared = Blip2TextGenerator.RESOURCES
    opts, batch = deployment_options(sized(declared, StageResources(max_actors=3, memory_gb=20), use_gpus=True), cfg)
    assert opts["ray_actor_options"] == {"num_cpus": declared.num_cpus, "num_gpus": declared.num_gpus,
                                         "memory": 20 * 1024**3}
    assert batch == declared.gpu_batch_size and opts["autoscaling_config"]["max_replicas"] == 3
    opts, batch = deployment_options(sized(declared), cfg)  # a CPU-only cluster: no GPU request
    assert "num_gpus" not in opts["ray_actor_options"] and batch == declared.batch_size
    # with no max_actors set, replicas go up to what the cluster holds: 4 GPUs take 4 BLIP2s of 0.75 GPU (a fraction
    # of a GPU is placed on one GPU: two never share one)
    four_gpus = capacity_of([{"CPU": 16, "GPU": 4, "memory": 256 * 1024**3}])
    opts, _ = deployment_options(sized(declared, use_gpus=True, capacity=four_gpus), cfg)
    assert (opts["autoscaling_config"]["min_replicas"], opts["autoscaling_config"]["max_replicas"]) == (1, 4)


def test_serve_config_file_matches_the_application():
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_CONFIG.read_text()))
    (app,) = config.applications
    assert app.import_path == "rag4dmc.deploy.app:build_app"
    validate(app.args, ServeConfig)
    assert [d.name for d in app.deployments] == list(DEPLOYMENTS)
    for d in app.deployments:
        auto = d.autoscaling_config
        assert auto and 1 <= auto["min_replicas"] <= auto["max_replicas"]


# ------------------------------------------------------------------------------------ the Serve application


@dataclass(frozen=True)
class Service:
    url: str
    cfg: ServeConfig
    kb: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(emoji_kb, kb) -> Iterator[Service]:
    """The application on loopback, built as `serve run deploy/serve_config.yaml` builds it (``build_app``
    on the args), with an API key, small limits and a batch wait that lets a burst batch. ``serve.run``
    returns once every replica is up (bounded by the test's timeout); Serve is shut down afterwards so the
    other modules sharing the Ray session are unaffected. (``kb``, the jobs' KB that the fault and signal tests
    serve, is built first: a KB build on the session's 2 CPUs would wait for the replicas' CPUs.)"""
    from ray import serve

    kb, _ = emoji_kb
    args = {"kb": kb, "api_key": API_KEY, "max_upload_bytes": MAX_UPLOAD, "max_text_chars": MAX_TEXT,
            "batch_wait_timeout_s": 0.25, "request_timeout_s": HTTP_TIMEOUT_S,
            "selection": {"image_quality": "none"}}
    port = _free_port()
    serve.start(http_options={"host": LOOPBACK, "port": port})
    try:
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        yield Service(f"http://{LOOPBACK}:{port}", validate(args, ServeConfig), kb)
    finally:
        serve.shutdown()


def _post(service: Service, *, json_body=None, files=None, data=None, headers=None, key: str | None = API_KEY):
    import requests

    headers = dict(headers or {})
    if key is not None:
        headers[API_KEY_HEADER] = key
    return requests.post(f"{service.url}{COMPLETE_PATH}", json=json_body, files=files, data=data, headers=headers,
                         timeout=HTTP_TIMEOUT_S)


def _samples(n: int, seed: int) -> tuple[list[bytes], list[str]]:
    from rag4dmc.pipeline.demo.corpus import make_internal

    table = make_internal(n, seed=seed)
    return table.column("image").to_pylist(), table.column("text").to_pylist()


def _kb_rows(kb: str) -> dict[str, dict]:
    from rag4dmc.pipeline.kb import store as kb_store

    entries = kb_store.load(kb, shards=[], with_entries=True).entries.to_pylist()
    return {e["id"]: e for e in entries}


@pytest.mark.timeout(900)
def test_health_and_completions_carry_the_jobs_provenance(service):
    import tempfile

    import requests

    from rag4dmc.actors.factory import create_encoder
    from rag4dmc.pipeline.config import EncoderConfig
    from rag4dmc.pipeline.io.kb_images import ExampleImages
    from rag4dmc.pipeline.kb import store as kb_store
    from rag4dmc.pipeline.kb.settings import effective_settings

    health = requests.get(f"{service.url}{HEALTH_PATH}", timeout=HTTP_TIMEOUT_S)  # no key needed
    kb = kb_store.load(service.kb, shards=None, with_entries=True)
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "kb_version": kb.version,
                             "config_hash": service.cfg.job_config().config_hash()}
    (image,), (text,) = _samples(1, seed=7)

    caption = _post(service, files={"image": ("scene.png", image, "image/png")}, data={"id": "img-1"})
    assert caption.status_code == 200, caption.text
    got = caption.json()
    assert (got["id"], got["status"], got["generated"], got["image"]) == ("img-1", "completed", "text", None)
    assert got["generator"] == "nn-consensus-retrieval"
    assert got["text"] == got["candidates"][got["chosen"]] and len(got["candidate_scores"]) == len(got["candidates"])
    assert (got["kb_version"], got["config_hash"]) == (kb.version, service.cfg.job_config().config_hash())
    assert set(got["seconds"]) == set(got["batch_sizes"]) == {"embed", "retrieve", "generate"}
    # the served neighbours are the library's: KnowledgeBase.retrieve on the lite encoder's embedding
    query = create_encoder(EncoderConfig()).encode_images([load_image(image)])
    retrieval, _, settings = effective_settings(service.cfg.retrieval, service.cfg.selection,
                                                kb.manifest["calibration"], "i2t")
    assert got["settings"] == settings  # the KB's calibrated settings, as the job would run them
    library = kb.retrieve(query, "image", retrieval)
    found = library.ids[0] >= 0
    assert got["retrieved_ids"] == [kb.entries.column("id")[int(r)].as_py() for r in library.ids[0][found]]
    np.testing.assert_allclose(got["fusion_scores"], library.fused[0][found], rtol=1e-4, atol=1e-5)

    same = _post(service, json_body={"image": base64.b64encode(image).decode(), "id": "img-1"})
    assert same.status_code == 200 and same.json()["text"] == got["text"]  # JSON and multipart: one answer

    painted = _post(service, json_body={"text": text, "id": "txt-1"})
    assert painted.status_code == 200, painted.text
    got = painted.json()
    assert (got["id"], got["generated"], got["text"], got["image_format"]) == ("txt-1", "image", text, "png")
    chosen_id = got["candidate_ids"][got["chosen"]]
    assert chosen_id in got["retrieved_ids"]
    assert 0 < got["confidence"] < 1  # the KB's calibrated model (the served KB is calibrated)
    # a request's min_confidence: above the row's confidence, the answer abstains and keeps the provenance
    unsure = _post(service, json_body={"text": text, "id": "txt-1", "min_confidence": 1.0})
    assert unsure.status_code == 200, unsure.text
    held = unsure.json()
    assert (held["status"], held["generated"], held["image"]) == ("abstained", None, None)
    assert (held["confidence"], held["candidate_ids"], held["chosen"]) == (
        got["confidence"], got["candidate_ids"], got["chosen"]) and "min_confidence" in held["hint"]
    served = Image.open(io.BytesIO(base64.b64decode(got["image"])))
    assert served.format == "PNG"
    entry = _kb_rows(service.kb)[chosen_id]  # the KB says where the image is; the service fetched it from there
    assert "image" not in entry and entry["image_shard"].endswith(".parquet")
    stored, _ = ExampleImages(cache_dir=tempfile.mkdtemp()).get(entry["image_uri"], entry["image_shard"],
                                                                entry["image_row"])
    assert np.array_equal(np.asarray(served), np.asarray(load_image(stored)))


@pytest.mark.timeout(600)
def test_bad_requests_get_4xx_with_a_json_message(service):
    import requests

    cases = {
        "no body": (_post(service, data=b"", headers={"Content-Type": "application/json"}), 400, "no body"),
        "both": (_post(service, json_body={"text": "a", "image": base64.b64encode(PNG).decode()}), 400, "both"),
        "neither": (_post(service, json_body={"id": "x"}), 400, "neither"),
        "undecodable": (_post(service, files={"image": ("x.png", b"not an image at all", "image/png")}), 400,
                        "could not be decoded"),
        "content type": (_post(service, data=b"a caption", headers={"Content-Type": "text/plain"}), 415,
                         "text/plain"),
        "oversized": (_post(service, json_body={"image": "A" * MAX_UPLOAD}), 413, str(MAX_UPLOAD)),
        "oversized, undeclared": (_post(service, data=iter([b"{", b" " * MAX_UPLOAD, b"}"]),
                                        headers={"Content-Type": "application/json"}), 413, str(MAX_UPLOAD)),
        "no key": (_post(service, json_body={"text": "a"}, key=None), 401, "missing"),
        "wrong key": (_post(service, json_body={"text": "a"}, key="guess"), 401, "wrong"),
    }
    for name, (response, status, phrase) in cases.items():
        assert response.status_code == status, (name, response.text)
        body = response.json()
        assert phrase in body["error"] and body["hint"], (name, body)
    assert requests.get(f"{service.url}{COMPLETE_PATH}", timeout=HTTP_TIMEOUT_S).status_code == 405


@pytest.mark.timeout(900)
def test_a_concurrent_burst_is_batched_and_each_request_gets_its_own_answer(service):
    images, texts = _samples(BURST // 2, seed=11)
    requests_ = [{"json_body": {"image": base64.b64encode(im).decode(), "id": f"burst-img-{i}"}}
                 for i, im in enumerate(images)]
    requests_ += [{"json_body": {"text": t, "id": f"burst-txt-{i}"}} for i, t in enumerate(texts)]
    alone = [_post(service, **r).json() for r in requests_]  # one at a time: batches of one

    with ThreadPoolExecutor(max_workers=len(requests_)) as pool:
        futures = [pool.submit(_post, service, **r) for r in requests_]
        burst = [f.result(timeout=BURST_TIMEOUT_S) for f in futures]  # a hang guard, not a speed check
    assert [r.status_code for r in burst] == [200] * len(requests_), [r.text for r in burst if r.status_code != 200]
    burst = [r.json() for r in burst]

    keys = ("id", "generated", "text", "image", "retrieved_ids", "candidates", "chosen")
    for sent, single, batched in zip(requests_, alone, burst):
        assert batched["id"] == sent["json_body"]["id"]
        assert {k: batched[k] for k in keys} == {k: single[k] for k in keys}
        np.testing.assert_allclose(batched["fusion_scores"], single["fusion_scores"], rtol=1e-4, atol=1e-5)
    assert len({json.dumps(b["retrieved_ids"]) for b in burst}) > len(burst) // 2  # distinct answers: the test bites
    assert max(a["batch_sizes"]["embed"] for a in alone) == 1
    for stage in ("embed", "retrieve", "generate"):
        assert max(b["batch_sizes"][stage] for b in burst) > 1, stage


class ServeProcess:
    """`rag4dmc serve` as an operator runs it: a process in a session of its own, with its own local Ray (which
    inherits its environment: a fault plan reaches the replicas), its output in a log file."""

    def __init__(self, kb: str, log: Path, *, config: dict | None = None, env: dict | None = None):
        self.port, self.log = _free_port(), log
        self.url = f"http://{LOOPBACK}:{self.port}"
        cmd = [sys.executable, "-m", "rag4dmc.pipeline.cli", "serve", "--kb", kb, "--host", LOOPBACK, "--port",
               str(self.port), "--image-quality", "none"]
        if config:
            path = log.with_suffix(".yaml")
            path.write_text(yaml.safe_dump(config))
            cmd += ["--config", str(path)]
        with log.open("w") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def healthy(self) -> bool:
        import requests

        try:
            return requests.get(f"{self.url}{HEALTH_PATH}", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def wait_healthy(self, timeout_s: float = 600) -> None:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rag4dmc serve exited ({self.proc.returncode}) before answering {HEALTH_PATH}:\n"
                                   + self.log.read_text()[-3000:])
            return self.healthy()

        until(up, timeout_s, f"rag4dmc serve to answer {HEALTH_PATH}", interval_s=1,
               detail=lambda: self.log.read_text()[-3000:])

    def group(self) -> list:
        """The live processes of the server's group (zombies are dead: a container's PID 1 may not reap them)."""
        import psutil

        out = []
        for p in psutil.process_iter():
            try:
                if os.getpgid(p.pid) == self.proc.pid and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except (ProcessLookupError, psutil.Error):
                continue
        return out

    def kill(self) -> None:
        if self.proc.poll() is None or self.group():
            os.killpg(self.proc.pid, signal.SIGKILL)


# ------------------------------------------------------------------------ Serve under faults and overload

CRASH_ID, SLOW_ID = "crash-me", "slow-me"
FAULTY_TIMEOUT_S = 5.0  # request_timeout_s of the faulty service: the hung generation passes it
HANG_S = 25.0  # the hung generation's length: past FAULTY_TIMEOUT_S, and it ends (the replica recovers)
RETRY_AFTER_S = 2


@dataclass(frozen=True)
class FaultyService:
    server: ServeProcess
    state: Path  # the fault plan's state folder: a fault's marker file appears when it fires


@pytest.fixture(scope="module")
def faulty(kb, tmp_path_factory) -> Iterator[FaultyService]:
    """`rag4dmc serve` with a fault plan: the caption generator's process exits on the request ``CRASH_ID``,
    the image generator hangs ``HANG_S`` on ``SLOW_ID``; one ingress replica taking one request at a time
    with one more queued, so a handful of concurrent requests overloads it."""
    root = tmp_path_factory.mktemp("faulty-serve")
    plan = {"dir": str(root / "state"), "faults": [
        {"stage": "generate", "kind": "exit", "row_key": CRASH_ID},
        {"stage": "generate", "kind": "hang", "row_key": SLOW_ID, "seconds": HANG_S}]}
    config = {"request_timeout_s": FAULTY_TIMEOUT_S, "max_ongoing_requests": 1, "max_queued_requests": 1,
              "retry_after_s": RETRY_AFTER_S, "resources": {"ingress": {"max_actors": 1}}}
    server = ServeProcess(kb, root / "serve.log", config=config, env={"RAG4DMC_FAULTS": json.dumps(plan)})
    try:
        server.wait_healthy()
        yield FaultyService(server, root / "state")
    finally:
        server.kill()


def _send(url: str, body: dict, timeout: float = HTTP_TIMEOUT_S):
    """The response, and when it came (``time.monotonic()``)."""
    import requests

    response = requests.post(f"{url}{COMPLETE_PATH}", json=body, timeout=timeout)
    return response, time.monotonic()


def _image_body(i: int, request_id: str) -> dict:
    (image,), _ = _samples(1, seed=100 + i)
    return {"image": base64.b64encode(image).decode(), "id": request_id}


@pytest.mark.timeout(600)
def test_a_hung_generation_gets_504_and_requests_past_the_queue_get_503_with_retry_after(faulty):
    url = faulty.server.url
    with ThreadPoolExecutor(max_workers=8) as pool:
        sent = time.monotonic()
        slow = pool.submit(_send, url, {"text": "a slow red circle", "id": SLOW_ID})
        # the hang fault's marker: the request holds the ingress's only slot, waiting for its generator
        until(lambda: any(faulty.state.glob("fault-1-*")), 60, "the slow request to reach its generator")
        burst = [pool.submit(_send, url, _image_body(i, f"burst-{i}")) for i in range(5)]
        answers = [f.result(timeout=HTTP_TIMEOUT_S) for f in burst]
        timed_out, slow_at = slow.result(timeout=HTTP_TIMEOUT_S)
    assert timed_out.status_code == 504, timed_out.text
    assert f"request_timeout_s={FAULTY_TIMEOUT_S:g} s" in timed_out.json()["error"]
    assert slow_at - sent < HANG_S  # answered at the timeout, not when the generation ended
    refused = [(r, s) for r, s in answers if r.status_code == 503]
    # one slot, one queued: at least 3 of the 5 are refused; the others are answered once the slot frees
    assert len(refused) >= 3, [r.status_code for r, _ in answers]
    assert {r.status_code for r, _ in answers} <= {200, 503}, [r.text for r, _ in answers]
    for response, answered_at in refused:
        assert response.headers["Retry-After"] == str(RETRY_AFTER_S)
        assert answered_at < slow_at  # refused at once: answered before the request ahead of it, not queued behind it


@pytest.mark.timeout(600)
def test_a_replica_that_crashes_mid_request_gives_a_json_500_with_an_error_id_and_is_restarted(faulty):
    crashed, _ = _send(faulty.server.url, _image_body(0, CRASH_ID))
    assert any(faulty.state.glob("fault-0-*"))  # the caption generator's process exited during the request
    assert crashed.status_code == 500, crashed.text
    body = crashed.json()
    assert body["error_id"] in body["error"] and body["hint"]
    until(lambda: body["error_id"] in faulty.server.log.read_text(), 60, "the error id in the service's log")
    # Serve replaces the dead replica; until it is up, requests fail or time out (a JSON 5xx), afterwards they succeed
    statuses: list[int] = []

    def answered() -> bool:
        response, _ = _send(faulty.server.url, _image_body(len(statuses) + 1, f"after-crash-{len(statuses)}"))
        statuses.append(response.status_code)
        return response.status_code == 200

    until(answered, 300, "a request answered after the crash")
    assert set(statuses[:-1]) <= {500, 503, 504}, statuses


def _stops_within_ten_seconds(server: ServeProcess, sig: signal.Signals) -> None:
    """``sig`` ends a healthy `rag4dmc serve` and every process of its group (its local Ray) within 10 s."""
    assert server.healthy() and len(server.group()) > 1  # the server and its Ray processes
    deadline = time.monotonic() + 10
    server.proc.send_signal(sig)
    server.proc.wait(timeout=10)
    until(lambda: not server.group(), max(0.0, deadline - time.monotonic()),
          "the server's processes to exit within 10 s of the signal",
          detail=lambda: str([p.name() for p in server.group()]))


@pytest.mark.timeout(600)
def test_rag4dmc_serve_stops_within_ten_seconds_of_sigterm_with_its_ray_processes(faulty):
    """SIGTERM (the signal Ray's own handler also wants: ``ray.init`` installs one), here after the faults above:
    a replica crashed and was restarted, a generation hung."""
    _stops_within_ten_seconds(faulty.server, signal.SIGTERM)


@pytest.mark.timeout(900)
def test_rag4dmc_serve_stops_within_ten_seconds_of_sigint_with_its_ray_processes(kb, tmp_path):
    """SIGINT (Ctrl-C) on a server of its own: the server and its local Ray's processes, all within 10 s."""
    server = ServeProcess(kb, tmp_path / "serve.log")
    try:
        server.wait_healthy()
        _stops_within_ten_seconds(server, signal.SIGINT)
    finally:
        server.kill()
