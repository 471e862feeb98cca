"""The completion service on Ray Serve: one sample in, the completed pair out, with the job's provenance.

Endpoints
---------
``POST /v1/complete``
    A sample with one modality; the service generates the other.

    * ``application/json``: ``{"text": "two red circles on the left"}`` or ``{"image": "<base64>"}``
      (standard base64 of a PNG/JPEG/WebP file, or a ``data:image/png;base64,...`` URL);
    * ``multipart/form-data``: an ``image`` file part or a ``text`` field
      (``curl -F image=@photo.png http://127.0.0.1:8000/v1/complete``).

    Either may carry an ``id`` (echoed back; a UUID otherwise). With an API key configured, every request
    sends it in the ``x-api-key`` header. The answer (200) is the batch job's output row
    (README "Output") as JSON::

        {"id": "...", "status": "completed", "error": null, "generated": "text" | "image",
         "text": "<the caption: generated, or the input>",
         "image": "<the generated image, base64>" | null,  "image_format": "png" | null,
         "generator": "nn-consensus-retrieval", "retrieved_ids": [...], "fusion_scores": [...],
         "candidates": [...] | null, "candidate_scores": [...], "chosen": 0,
         "kb_version": "...", "config_hash": "...",
         "seconds": {"embed": s, "retrieve": s, "generate": s},
         "batch_sizes": {"embed": n, "retrieve": n, "generate": n}}

    The input image is not echoed back. ``config_hash`` is the one ``rag4dmc complete`` writes for the same
    retrieval / generator / selection settings; ``seconds`` are the actor-seconds each stage spent on the
    request (its share of its batch, the job's ``seconds_*``); ``batch_sizes`` says how many requests each
    stage batched this one with. Errors are JSON ``{"error": what was wrong, "hint": what to do}``: 400 (no body, both
    modalities, neither, bad JSON / base64 / multipart, undecodable image, text too long), 401 (API key
    missing or wrong), 413 (body over ``max_upload_bytes``), 415 (not JSON or multipart), 422 (completion
    failed: the row's error and provenance), 500 (a deployment failed, e.g. a replica crashed: the body's
    ``error_id`` is in the log line with the traceback; Serve restarts the replica), 503 with ``Retry-After``
    (overload: every ingress replica holds ``max_ongoing_requests`` and the proxy's queue holds
    ``max_queued_requests``; or a deployment restarting), 504 (over ``request_timeout_s``).

``GET /healthz``
    ``{"status": "ok", "kb_version": ..., "config_hash": ...}`` once every deployment has answered (a replica of
    each is up: the ingress alone can be up minutes before the models are loaded); 503 with ``Retry-After``
    before. Needs no API key.

Graph
-----
::

    HTTP -> Completion (ingress: key, limits, parse, decode + resize)
              -> Encoder (@serve.batch: create_encoder's towers)
              -> Retriever (@serve.batch: every KB shard, two-stage fusion retrieval)
              -> TextGenerator | ImageGenerator (@serve.batch: the job's CompleteTexts / CompleteImages,
                                                  then rag4dmc.pipeline.job.writer.finalize)

Each deployment runs the batch job's code on a batch of requests and maps results back by position, so
an answer depends only on its own request (BLIP2 / SDXL sampling excepted: as in the job, the seed is
drawn from the ids of the requests batched together). Replicas are sized from the actor classes'
``RESOURCES`` (``actors/resources.py``; ``resources.<stage>`` overrides them, stages ingress / embed /
retrieve / generate): CPUs, GPUs and memory, replica counts (``min_actors`` .. ``max_actors``) and the
largest batch; a batch waits ``batch_wait_timeout_s`` to fill. The Retriever holds every shard of the
knowledge base. The autoscaling in ``deploy/serve_config.yaml`` overrides the replica counts.

Configuration
-------------
``build_app(args)`` is the application builder: ``args`` are ``rag4dmc.pipeline.config.ServeConfig`` keys (the
job's ``retrieval`` / ``generator`` / ``selection`` / ``storage`` keys, plus ``kb``, ``api_key``,
``max_upload_bytes``, ``max_text_chars``, ``batch_wait_timeout_s``, ``request_timeout_s``,
``max_ongoing_requests``, ``max_queued_requests``, ``retry_after_s``, ...).
``deploy/serve_config.yaml`` holds them with the HTTP options and each deployment's autoscaling::

    serve run deploy/serve_config.yaml       # or: serve deploy deploy/serve_config.yaml (a running cluster)
    rag4dmc serve --kb KB [--host 127.0.0.1 --port 8000 --api-key KEY --config FILE.yaml]
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request) at run time.
import asyncio
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from rag4dmc.actors.complete import CompleteImages, CompleteTexts
from rag4dmc.actors.encoders import encoder_image_size
from rag4dmc.actors.factory import create_encoder, encoder_class
from rag4dmc.actors.resources import Resources, use_gpus
from rag4dmc.actors.retrieve import RetrieveNeighbours
from rag4dmc.deploy.protocol import (
    API_KEY_HEADER,
    CompletionRequest,
    Query,
    RequestError,
    answer,
    check_api_key,
    check_declared_length,
    internal_error,
    parse_request,
    prepare_query,
    read_body,
    unavailable,
)
from rag4dmc.pipeline.config import (
    EncoderConfig,
    GeneratorConfig,
    RetrievalConfig,
    SelectionConfig,
    ServeConfig,
    StageResources,
    validate,
)
from rag4dmc.pipeline.core.retrieval import search
from rag4dmc.pipeline.io.storage import Storage
from rag4dmc.pipeline.job.scaling import Capacity, Pool, read_capacity, size_pools
from rag4dmc.pipeline.job.writer import finalize
from rag4dmc.pipeline.kb import store as kb_store
from rag4dmc.pipeline.kb.calibrate import effective_settings
from rag4dmc.pipeline.schema import TASK_I2T, TASK_T2I

log = logging.getLogger(__name__)
# Serve's replica logger: its lines go to the replica's log file and stderr (the driver's output, `serve` logs)
replica_log = logging.getLogger("ray.serve")

APP_NAME = "rag4dmc"
COMPLETE_PATH, HEALTH_PATH = "/v1/complete", "/healthz"
INGRESS, ENCODER, RETRIEVER = "Completion", "Encoder", "Retriever"
TEXT_GENERATOR, IMAGE_GENERATOR = "TextGenerator", "ImageGenerator"  # image -> text, text -> image
DEPLOYMENTS = (INGRESS, ENCODER, RETRIEVER, TEXT_GENERATOR, IMAGE_GENERATOR)
# A batching replica holds one batch running and the next one filling; autoscaling aims at half that.
ONGOING_PER_BATCH = 2
# The ingress parses requests and decodes images (no model): a quarter CPU, like the job's CPU tasks.
INGRESS_RESOURCES = Resources(num_cpus=0.25, memory_gb=1.0)
HEALTH_PING_S = 2.0  # /healthz waits this long for every deployment's ping before it answers 503


class Pingable:
    """A deployment /healthz can ping: its replica is up once ``ping`` answers."""

    def ping(self) -> bool:
        return True

api = FastAPI(title="rag4dmc", summary="Complete the missing modality of an image-text sample (RAG4DMC).")


@api.exception_handler(RequestError)
async def _refuse(request: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


# ------------------------------------------------------------------------------- messages between deployments


@dataclass(frozen=True)
class Batched:
    """What one batched call spent on a request: the size of the batch it ran in and its share of the time."""

    size: int
    seconds: float

    @staticmethod
    def since(start: float, size: int) -> "Batched":
        return Batched(size, (time.perf_counter() - start) / max(size, 1))


@dataclass(frozen=True)
class Embedded:
    vector: np.ndarray  # float32, unit norm
    batch: Batched


@dataclass(frozen=True)
class Retrieved:
    """The ``ret_*`` columns of the job's retrieval stage for one request, and the pseudo-embedding."""

    ids: np.ndarray  # int64 [n_results], KB rows (-1: none)
    fused: np.ndarray
    cross: np.ndarray
    pseudo: np.ndarray
    batch: Batched


@dataclass(frozen=True)
class Completed:
    row: dict[str, Any]  # one row of rag4dmc.pipeline.schema.OUTPUT_SCHEMA
    batch: Batched


def configure_batching(method, max_batch_size: int, wait_timeout_s: float) -> None:
    """Set a ``@serve.batch`` method's batch size and wait from the config (the decorator's are defaults)."""
    method.set_max_batch_size(max_batch_size)
    method.set_batch_wait_timeout_s(wait_timeout_s)


# ----------------------------------------------------------------------------------------------- deployments


@serve.deployment(name=ENCODER)
class Encoder(Pingable):
    """The knowledge base's frozen encoders (``create_encoder``): one batch of image and text queries at a time."""

    def __init__(self, encoder: EncoderConfig, max_batch_size: int, wait_timeout_s: float):
        self.encoder = create_encoder(encoder)
        configure_batching(self.embed, max_batch_size, wait_timeout_s)

    @serve.batch
    async def embed(self, queries: list[Query]) -> list[Embedded]:
        return await asyncio.to_thread(self._embed, queries)

    def _embed(self, queries: list[Query]) -> list[Embedded]:
        start = time.perf_counter()
        vectors: list[np.ndarray | None] = [None] * len(queries)
        images = [i for i, q in enumerate(queries) if q.modality == "image"]
        texts = [i for i, q in enumerate(queries) if q.modality == "text"]
        if images:
            for i, v in zip(images, self.encoder.encode_pixels(np.stack([queries[i].pixels for i in images]))):
                vectors[i] = v.copy()  # its own row, not a view of the batch's array
        if texts:
            for i, v in zip(texts, self.encoder.encode_texts([queries[i].text for i in texts])):
                vectors[i] = v.copy()
        batch = Batched.since(start, len(queries))
        return [Embedded(v, batch) for v in vectors]


@serve.deployment(name=RETRIEVER)
class Retriever(Pingable):
    """Two-stage fusion retrieval over every shard of the knowledge base (``rag4dmc.pipeline.kb.knowledge_base``), as the job's
    retrieval stage does: each shard's stage-1 candidates, merged, then the fused rerank."""

    def __init__(self, kb: str, storage_options: dict, retrieval: dict[str, RetrievalConfig], max_batch_size: int,
                 wait_timeout_s: float):
        self.kb = kb_store.load(kb, storage_options, with_entries=False)
        self.cfgs = retrieval  # per observed modality: each direction's (calibrated) settings
        configure_batching(self.search, max_batch_size, wait_timeout_s)

    @serve.batch
    async def search(self, observed: list[str], vectors: list[np.ndarray]) -> list[Retrieved]:
        return await asyncio.to_thread(self._search, observed, vectors)

    def _search(self, observed: list[str], vectors: list[np.ndarray]) -> list[Retrieved]:
        start = time.perf_counter()
        out: list[tuple[np.ndarray, ...] | None] = [None] * len(vectors)
        for modality in sorted(set(observed)):
            rows = [i for i, m in enumerate(observed) if m == modality]
            query = np.stack([vectors[i] for i in rows])
            pseudo, cfg = self.kb.pseudo(query, modality), self.cfgs[modality]
            done = search(self.kb.shards, query, pseudo, modality, cfg)
            for j, i in enumerate(rows):
                out[i] = (done.ids[j].copy(), done.fused[j].copy(), done.cross[j].copy(), pseudo[j].copy())
        batch = Batched.since(start, len(vectors))
        return [Retrieved(*r, batch=batch) for r in out]


@serve.deployment
class Generator(Pingable):
    """Generation and selection of one direction: the job's ``CompleteTexts`` (``task`` i2t) or
    ``CompleteImages`` (t2i) on a batch of requests, finalized to the job's output rows."""

    def __init__(self, kb: str, storage_options: dict, task: str, generator: GeneratorConfig,
                 selection: SelectionConfig, encoder: EncoderConfig, config_hash: str, max_batch_size: int,
                 wait_timeout_s: float, settings: dict | None = None):
        loaded = kb_store.load(kb, storage_options, shards=[], with_entries=False)
        stage = CompleteTexts if task == TASK_I2T else CompleteImages
        self.complete = stage(generator, selection, encoder, kb, storage_options, settings=settings)
        self.task, self.kb_version, self.config_hash = task, loaded.version, config_hash
        configure_batching(self.generate, max_batch_size, wait_timeout_s)

    @serve.batch
    async def generate(self, requests: list[CompletionRequest], retrieved: list[Retrieved],
                       seconds_embed: list[float]) -> list[Completed]:
        return await asyncio.to_thread(self._generate, requests, retrieved, seconds_embed)

    def _generate(self, requests: list[CompletionRequest], retrieved: list[Retrieved],
                  seconds_embed: list[float]) -> list[Completed]:
        start = time.perf_counter()
        out = self.complete(generation_batch(self.task, requests, retrieved, seconds_embed))
        rows = finalize(out, kb_version=self.kb_version, config_hash=self.config_hash).to_pylist()
        batch = Batched.since(start, len(requests))
        return [Completed(row, batch) for row in rows]


def generation_batch(task: str, requests: list[CompletionRequest], retrieved: list[Retrieved],
                     seconds_embed: list[float]) -> dict[str, np.ndarray]:
    """The numpy batch the job's completion stage takes, one row per request (``row_key`` is the request id)."""
    n = len(requests)

    def column(values: list) -> np.ndarray:
        out = np.empty(n, dtype=object)  # filled item by item: numpy must not split bytes or lists
        out[:] = values
        return out

    ids = column([r.id for r in requests])
    return {
        "row_key": ids, "id": ids,
        "task": column([task] * n), "error": column([None] * n),
        "text": column([r.text for r in requests]), "image": column([r.image for r in requests]),
        "ret_ids": np.stack([r.ids for r in retrieved]), "ret_fused": np.stack([r.fused for r in retrieved]),
        "ret_cross": np.stack([r.cross for r in retrieved]), "pseudo": np.stack([r.pseudo for r in retrieved]),
        "seconds_embed": np.asarray(seconds_embed, np.float32),
        "seconds_retrieve": np.asarray([r.batch.seconds for r in retrieved], np.float32),
    }


@serve.deployment(name=INGRESS)
@serve.ingress(api)
class Completion:
    """HTTP ingress: checks the key and the limits, parses and decodes, then calls encoder -> retriever ->
    the generator of the missing modality. CPU only: it decodes images, no model runs here."""

    def __init__(self, encoder: DeploymentHandle, retriever: DeploymentHandle, text_generator: DeploymentHandle,
                 image_generator: DeploymentHandle, cfg: ServeConfig, image_size: int, max_pixels: int,
                 kb_version: str):
        self.encoder, self.retriever = encoder, retriever
        self.generators = {TASK_I2T: text_generator, TASK_T2I: image_generator}
        self.cfg, self.image_size, self.max_pixels = cfg, image_size, max_pixels
        self.health = {"status": "ok", "kb_version": kb_version, "config_hash": cfg.job_config().config_hash()}
        self.ready = False  # every deployment has answered /healthz's ping

    @api.get(HEALTH_PATH)
    async def healthz(self) -> dict[str, str]:
        """Ready once each deployment has answered a ping: checked until it has, never again after (a probe
        must not queue behind a busy generator's batches)."""
        if not self.ready:
            pings = [h.ping.remote() for h in (self.encoder, self.retriever, *self.generators.values())]
            try:
                await asyncio.wait_for(asyncio.gather(*pings), HEALTH_PING_S)
            except Exception:  # noqa: BLE001 - not up yet (or restarting): say so, never hang the probe
                raise unavailable("its models are still loading", self.cfg.retry_after_s) from None
            self.ready = True
        return self.health

    @api.post(COMPLETE_PATH)
    async def complete(self, request: Request) -> JSONResponse:
        check_api_key(request.headers.get(API_KEY_HEADER), self.cfg.api_key)
        check_declared_length(request.headers.get("content-length"), self.cfg.max_upload_bytes)
        body = await read_body(request.stream(), self.cfg.max_upload_bytes)
        sample = parse_request(request.headers.get("content-type"), body, max_text_chars=self.cfg.max_text_chars)
        query = await asyncio.to_thread(prepare_query, sample, image_size=self.image_size,
                                        max_pixels=self.max_pixels)
        try:
            done, batch_sizes = await asyncio.wait_for(self._run(sample, query), self.cfg.request_timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(504, f"no answer within request_timeout_s={self.cfg.request_timeout_s:g} s",
                               "retry later (the service is busy or still starting), or raise request_timeout_s"
                               ) from None
        except BackPressureError as exc:  # a deployment's queue is full
            raise unavailable(f"a deployment's queue is full ({exc.message})", self.cfg.retry_after_s) from None
        except DeploymentUnavailableError as exc:
            raise unavailable(f"a deployment is unavailable ({exc.message})", self.cfg.retry_after_s) from None
        except Exception as exc:  # a deployment failed (a replica crashed, a bug): say so with an id, keep serving
            failure = internal_error(exc)
            replica_log.exception("request %s failed: error id %s", sample.id, failure.error_id)
            raise failure from None
        status, answer_body = answer(done.row, image_format=self.cfg.generator.image_format,
                                     batch_sizes=batch_sizes)
        return JSONResponse(answer_body, status_code=status)

    async def _run(self, sample: CompletionRequest, query: Query) -> tuple[Completed, dict[str, int]]:
        embedded: Embedded = await self.encoder.embed.remote(query)
        retrieved: Retrieved = await self.retriever.search.remote(query.modality, embedded.vector)
        done: Completed = await self.generators[sample.task].generate.remote(sample, retrieved,
                                                                             embedded.batch.seconds)
        return done, {"embed": embedded.batch.size, "retrieve": retrieved.batch.size, "generate": done.batch.size}


# ------------------------------------------------------------------------------------------------ the graph


def replica_resources(declared: dict[str, Resources], overrides: dict[str, StageResources | None], use_gpus: bool,
                      capacity: Capacity | None) -> dict[str, Resources]:
    """Each deployment's replica resources (``declared``, keyed ``<stage>`` or ``<stage>:<direction>``) with the
    config's override per stage, and its most replicas from the cluster as the job sizes its pools
    (``rag4dmc.pipeline.job.scaling.size_pools``; the two generators share the rows half and half). Without a cluster to read
    (``capacity`` None) a deployment keeps its least size."""
    pools = {}
    for name, res in declared.items():
        override = overrides.get(name.split(":")[0])
        share = 0.5 if ":" in name else 1.0
        pools[name] = Pool(res.with_overrides(override).for_gpu(use_gpus), share,
                           fixed=override is not None and override.max_actors is not None)
    if capacity is None:
        return {n: replace(p.resources, max_actors=p.resources.max_actors or p.resources.min_actors)
                for n, p in pools.items()}
    return size_pools(pools, capacity)


def deployment_options(res: Resources, max_ongoing_requests: int | None = None) -> tuple[dict[str, Any], int]:
    """Serve options for replicas of ``res`` (sized: :func:`replica_resources`) and its batch size. Serve autoscales
    each deployment between its least and most replicas on the requests in flight."""
    batch_size = res.effective_batch_size()
    ongoing = max_ongoing_requests or ONGOING_PER_BATCH * batch_size
    autoscaling = {"min_replicas": res.min_actors, "max_replicas": res.max_actors,
                   "target_ongoing_requests": max(1, ongoing // ONGOING_PER_BATCH)}
    return ({"ray_actor_options": res.serve_options(), "autoscaling_config": autoscaling,
             "max_ongoing_requests": ongoing}, batch_size)


def generator_resources(generator: GeneratorConfig, task: str) -> Resources:
    stage = CompleteTexts if task == TASK_I2T else CompleteImages
    return stage.resources(generator)


def compose(cfg: ServeConfig) -> Application:
    """The deployment graph serving ``cfg``; fails here, before any replica starts, on a missing knowledge
    base or NIQE parameter file."""
    from rag4dmc.pipeline.job.runner import preflight

    storage_options = Storage(cfg.storage).options
    manifest = kb_store.load(cfg.kb, storage_options, shards=[], with_entries=False).manifest
    preflight(cfg.job_config(), manifest)
    encoder = EncoderConfig.model_validate(manifest["config"]["encoder"])
    wait = cfg.batch_wait_timeout_s
    sized = replica_resources(
        {"ingress": INGRESS_RESOURCES, "embed": encoder_class(encoder).RESOURCES,
         "retrieve": RetrieveNeighbours.RESOURCES, f"generate:{TASK_I2T}": generator_resources(cfg.generator, TASK_I2T),
         f"generate:{TASK_T2I}": generator_resources(cfg.generator, TASK_T2I)},
        cfg.resources, use_gpus(cfg.accelerators), read_capacity() if ray.is_initialized() else None)
    for name, res in sized.items():
        log.info("deployment %s: %d..%d replicas", name, res.min_actors, res.max_actors)
    enc_opts, enc_batch = deployment_options(sized["embed"])
    ret_opts, ret_batch = deployment_options(sized["retrieve"])
    generators, retrieval = [], {}
    for name, task, observed in ((TEXT_GENERATOR, TASK_I2T, "image"), (IMAGE_GENERATOR, TASK_T2I, "text")):
        retrieval[observed], selection, settings = effective_settings(cfg.retrieval, cfg.selection,
                                                                      manifest.get("calibration"), task)
        gen_opts, gen_batch = deployment_options(sized[f"generate:{task}"])
        generators.append(Generator.options(name=name, **gen_opts).bind(
            cfg.kb, storage_options, task, cfg.generator, selection, encoder, cfg.job_config().config_hash(),
            gen_batch, wait, settings))
    ingress_opts, _ = deployment_options(sized["ingress"], cfg.max_ongoing_requests)
    # overload: past max_ongoing_requests per replica and max_queued_requests per proxy, 503 + Retry-After
    ingress_opts |= {"max_queued_requests": cfg.max_queued_requests,
                     "backpressure_config": {"status_code": 503, "retry_after_s": cfg.retry_after_s}}
    return Completion.options(**ingress_opts).bind(
        Encoder.options(**enc_opts).bind(encoder, enc_batch, wait),
        Retriever.options(**ret_opts).bind(cfg.kb, storage_options, retrieval, ret_batch, wait),
        *generators, cfg, encoder_image_size(encoder), encoder.max_image_pixels, manifest["version"])


def build_app(args: dict[str, Any]) -> Application:
    """Serve's application builder (``import_path: rag4dmc.deploy.app:build_app``); ``args`` are ServeConfig keys."""
    return compose(validate(args, ServeConfig, source="application args"))


SHUTDOWN_S = 8.0  # ``rag4dmc serve`` exits this long after SIGINT/SIGTERM at most, its Ray processes with it


def run_local(cfg: ServeConfig, host: str, port: int) -> None:
    """Serve ``cfg`` at http://host:port until SIGINT (Ctrl-C) or SIGTERM (``rag4dmc serve``).

    Then the application is deleted and Ray shut down (the local cluster ``ray.init`` started goes with it),
    within ``SHUTDOWN_S``; past that the process exits anyway."""
    import ray

    if "://" not in cfg.kb:  # a replica resolves a relative path in its own working directory
        cfg = cfg.model_copy(update={"kb": os.path.abspath(cfg.kb)})
    stop = threading.Event()
    started_ray = not ray.is_initialized()
    previous: dict = {}
    try:
        if started_ray:
            ray.init()  # installs Ray's own SIGTERM handler: ours go in after it
        serve.start(http_options={"host": host, "port": port})

        def on_signal(signum, frame) -> None:
            if not serving.is_set():  # still deploying: interrupt serve.run
                raise KeyboardInterrupt
            stop.set()

        serving = threading.Event()
        if threading.current_thread() is threading.main_thread():
            previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        serve.run(compose(cfg), name=APP_NAME, route_prefix="/")  # returns once every replica is up
        serving.set()
        print(f"rag4dmc: serving {cfg.kb} at http://{host}:{port}{COMPLETE_PATH} (Ctrl-C stops)", flush=True)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:  # a signal while starting
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _shutdown(ray, started_ray)


def _shutdown(ray, started_ray: bool) -> None:
    """Delete the app, and shut Ray down if this process started it (else the cluster's other apps stay), within
    ``SHUTDOWN_S``: a replica stuck in a request must not keep the process alive, so past the bound it exits
    (a local cluster's processes die with their driver)."""
    done = threading.Event()

    def watchdog() -> None:
        if not done.wait(SHUTDOWN_S):
            log.warning("shutdown took over %.0f s; exiting", SHUTDOWN_S)
            os._exit(0)

    threading.Thread(target=watchdog, daemon=True).start()
    print("rag4dmc: stopping", flush=True)
    try:
        if not ray.is_initialized():
            return
        try:
            serve.delete(APP_NAME, _blocking=False)
        except Exception as exc:  # noqa: BLE001 - not deployed yet (stopped while starting)
            log.info("no application to delete (%s)", exc)
        if started_ray:
            ray.shutdown()
    finally:
        done.set()
