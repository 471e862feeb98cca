"""The completion service's deployments (Ray Serve): the ingress (key, limits, parse, decode), Encoder, Retriever
and the two Generators, each running the batch job's stage code on a batch of requests, and the messages between
them. The HTTP API: docs/serve.md; the graph: ``rag4dmc.deploy.app``.
"""

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from rag4dmc.actors.complete import CompleteImages, CompleteTexts, completion_batch
from rag4dmc.actors.factory import create_encoder
from rag4dmc.actors.stage import object_column
from rag4dmc.deploy.protocol import (
    API_KEY_HEADER,
    CompletionRequest,
    Query,
    RequestError,
    abstain_below,
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
)
from rag4dmc.pipeline.core.retrieval import search
from rag4dmc.pipeline.job.writer import finalize
from rag4dmc.pipeline.kb import store as kb_store
from rag4dmc.pipeline.kb.settings import confidence_model
from rag4dmc.pipeline.schema import TASK_I2T, TASK_T2I

log = logging.getLogger(__name__)


replica_log = logging.getLogger("ray.serve")


COMPLETE_PATH, HEALTH_PATH = "/v1/complete", "/healthz"


INGRESS, ENCODER, RETRIEVER = "Completion", "Encoder", "Retriever"


TEXT_GENERATOR, IMAGE_GENERATOR = "TextGenerator", "ImageGenerator"  # image -> text, text -> image


DEPLOYMENTS = (INGRESS, ENCODER, RETRIEVER, TEXT_GENERATOR, IMAGE_GENERATOR)


HEALTH_PING_S = 2.0  # /healthz waits this long for every deployment's ping before it answers 503


class Pingable:
    """A deployment /healthz can ping: its replica is up once ``ping`` answers."""

    def ping(self) -> bool:
        return True


api = FastAPI(title="rag4dmc", summary="Complete the missing modality of an image-text sample (RAG4DMC).")


@api.exception_handler(RequestError)
async def _refuse(request: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


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
    """Two-stage fusion retrieval over every shard of the knowledge base, loaded once per replica without its
    entries (``rag4dmc.pipeline.kb.store.load``): the pseudo-embedding from the KB's mapping, each shard's stage-1
    candidates merged, then the fused rerank (``rag4dmc.pipeline.core.retrieval.search``; the job splits the same
    steps over shard groups, ``rag4dmc.actors.retrieve``). A batch may mix both directions: each is searched with
    its own settings (the KB's calibrated ones under the request's config, ``effective_settings``)."""

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
        self.complete = stage(generator, selection, encoder, kb, storage_options, settings=settings,
                              confidence=confidence_model(loaded.manifest.get("calibration"), task))
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
    """The completion stages' batch (``rag4dmc.actors.complete.completion_batch``), one row per request
    (``row_key`` is the request id), with the seconds its embedding and retrieval took."""
    ids = [r.id for r in requests]
    return completion_batch(
        task, ids, [r.text for r in requests], [r.image for r in requests], np.stack([r.ids for r in retrieved]),
        np.stack([r.fused for r in retrieved]), np.stack([r.cross for r in retrieved]),
        np.stack([r.pseudo for r in retrieved]), id=object_column(ids),
        seconds_embed=np.asarray(seconds_embed, np.float32),
        seconds_retrieve=np.asarray([r.batch.seconds for r in retrieved], np.float32))


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
        status, answer_body = answer(abstain_below(done.row, sample.min_confidence),
                                     image_format=self.cfg.generator.image_format, batch_sizes=batch_sizes)
        return JSONResponse(answer_body, status_code=status)

    async def _run(self, sample: CompletionRequest, query: Query) -> tuple[Completed, dict[str, int]]:
        embedded: Embedded = await self.encoder.embed.remote(query)
        retrieved: Retrieved = await self.retriever.search.remote(query.modality, embedded.vector)
        done: Completed = await self.generators[sample.task].generate.remote(sample, retrieved,
                                                                             embedded.batch.seconds)
        return done, {"embed": embedded.batch.size, "retrieve": retrieved.batch.size, "generate": done.batch.size}
