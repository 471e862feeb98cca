"""The completion service on Ray Serve, as one application graph: one sample in, the completed pair out, with the
job's provenance.

    HTTP -> Completion (ingress: key, limits, parse, decode + resize)
              -> Encoder (@serve.batch: create_encoder's towers)
              -> Retriever (@serve.batch: every KB shard, two-stage fusion retrieval)
              -> TextGenerator | ImageGenerator (@serve.batch: the job's CompleteTexts / CompleteImages,
                                                  then rag4dmc.pipeline.job.writer.finalize)

``build_app(args)`` is Serve's application builder (``import_path: rag4dmc.deploy.app:build_app``; ``args`` are
``rag4dmc.pipeline.config.ServeConfig`` keys, as in ``deploy/serve_config.yaml``). Replicas are sized from the actor
classes' ``RESOURCES`` and the cluster, as the job sizes its pools. The deployments: ``rag4dmc.deploy.deployments``;
the HTTP protocol: ``rag4dmc.deploy.protocol``; the API, its answers and errors: docs/serve.md.
"""

import logging
from dataclasses import replace
from typing import Any

import ray
from ray.serve import Application

from rag4dmc.actors.complete import CompleteImages, CompleteTexts
from rag4dmc.actors.encoders import encoder_image_size
from rag4dmc.actors.factory import encoder_class
from rag4dmc.actors.resources import Resources, use_gpus
from rag4dmc.actors.retrieve import RetrieveNeighbours
from rag4dmc.deploy.deployments import (
    IMAGE_GENERATOR,
    TEXT_GENERATOR,
    Completion,
    Encoder,
    Generator,
    Retriever,
)
from rag4dmc.pipeline.config import (
    EncoderConfig,
    GeneratorConfig,
    ServeConfig,
    StageResources,
    validate,
)
from rag4dmc.pipeline.io.storage import Storage
from rag4dmc.pipeline.job.scaling import Capacity, Pool, read_capacity, size_pools
from rag4dmc.pipeline.kb import store as kb_store
from rag4dmc.pipeline.kb.settings import effective_settings
from rag4dmc.pipeline.schema import TASK_I2T, TASK_T2I

log = logging.getLogger(__name__)


log = logging.getLogger(__name__)


APP_NAME = "rag4dmc"


ONGOING_PER_BATCH = 2


INGRESS_RESOURCES = Resources(num_cpus=0.25, memory_gb=1.0)


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


def deployment_options(res: Resources, cfg: ServeConfig, max_ongoing_requests: int | None = None
                       ) -> tuple[dict[str, Any], int]:
    """Serve options for replicas of ``res`` (sized: :func:`replica_resources`) and its batch size. Serve autoscales
    each deployment between its least and most replicas on the requests in flight, after ``cfg``'s delays."""
    batch_size = res.effective_batch_size()
    ongoing = max_ongoing_requests or ONGOING_PER_BATCH * batch_size
    autoscaling = {"min_replicas": res.min_actors, "max_replicas": res.max_actors,
                   "target_ongoing_requests": max(1, ongoing // ONGOING_PER_BATCH),
                   "upscale_delay_s": cfg.upscale_delay_s, "downscale_delay_s": cfg.downscale_delay_s}
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
    enc_opts, enc_batch = deployment_options(sized["embed"], cfg)
    ret_opts, ret_batch = deployment_options(sized["retrieve"], cfg)
    generators, retrieval = [], {}
    for name, task, observed in ((TEXT_GENERATOR, TASK_I2T, "image"), (IMAGE_GENERATOR, TASK_T2I, "text")):
        retrieval[observed], selection, settings = effective_settings(cfg.retrieval, cfg.selection,
                                                                      manifest.get("calibration"), task)
        gen_opts, gen_batch = deployment_options(sized[f"generate:{task}"], cfg)
        generators.append(Generator.options(name=name, **gen_opts).bind(
            cfg.kb, storage_options, task, cfg.generator, selection, encoder, cfg.job_config().config_hash(),
            gen_batch, wait, settings))
    ingress_opts, _ = deployment_options(sized["ingress"], cfg, cfg.max_ongoing_requests)
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
