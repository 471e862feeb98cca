"""Every tunable of rag4dmc, as typed and validated objects in one place.

The YAML config of the CLI mirrors these models key for key: an unknown key or a bad value is an
error that names the key (pydantic's ``extra="forbid"`` and field constraints do the naming).
"""

from __future__ import annotations

import hashlib
import json
from enum import IntEnum
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)


class Stream(IntEnum):
    """The random streams drawn from a config's ``seed`` (numpy's ``default_rng([seed, stream])``), one per use,
    so that no two uses share draws."""

    INDEX_TRAIN_SAMPLE = 7  # the rows an index is trained on (rag4dmc.pipeline.kb.build)
    RECALL_QUERIES = 11  # the rows whose neighbours measure an index's recall (rag4dmc.pipeline.kb.build)
    CALIBRATION_SAMPLE = 13  # the rows a calibration fits on, past its max_rows (rag4dmc.pipeline.kb.calibrate)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class EncoderConfig(_Strict):
    """Which frozen encoders embed images and texts (``rag4dmc.actors.factory.create_encoder``)."""

    backend: Literal["lite", "open_clip"] = Field("lite",
        description="the frozen encoders: lite (offline default) or open_clip")
    model_name: str = Field("ViT-L-14", description="open_clip architecture name")
    pretrained: str | None = Field(
        None, description="open_clip pretrained tag (e.g. laion2b_s32b_b82k) or a local/s3:// checkpoint"
    )
    model_dir: str | None = Field(None, description="folder with downloaded weights (no hub access)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto",
        description="where the encoders run (auto: a GPU when the actor has one)")
    precision: Literal["fp32", "fp16", "bf16"] = "fp16"
    cpu_runtime: Literal["onnxruntime", "torch"] = Field(
        "onnxruntime", description="what runs the lite image tower on CPU: ONNX Runtime (exported once per machine, "
        "about 2.4x torch on one thread, same embeddings) or torch eager; on a GPU it is always torch")
    batch_size: int = Field(64, ge=1)
    max_image_pixels: int = Field(
        89_478_485, ge=1, description="decompression-bomb guard: larger images are per-row errors"
    )


class MappingConfig(_Strict):
    """The bidirectional image<->text MLP, trained on internal pairs only (L_map)."""

    hidden_dim: int = Field(1024, ge=1)
    num_layers: int = Field(2, ge=1, le=8)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(256, ge=1)
    max_epochs: int = Field(200, ge=1, description="most epochs of the mapping MLP's training")
    patience: int = Field(10, ge=1, description="epochs without held-out improvement before stopping")
    val_fraction: float = Field(0.1, gt=0, lt=1)
    max_rows: int = Field(
        200_000, ge=4, description="internal pairs the mapping trains on at most: a random sample of a larger set")
    seed: int = 0


class FilterConfig(_Strict):
    """k-means cluster filtering of the external corpus against the internal one."""

    n_clusters_internal: int | None = Field(None, ge=1, description="None: about sqrt(n), at most 1024")
    n_clusters_external: int | None = Field(None, ge=1, description="None: about sqrt(n), at most 4096")
    tau_cent: float = Field(0.5, ge=-1, le=1, description="min cosine external->matched internal centroid")
    tau_inst: float = Field(0.3, ge=-1, le=1, description="min cosine instance->matched internal centroid")
    niter: int = Field(20, ge=1)
    nredo: int = Field(3, ge=1, description="k-means restarts; the lowest-objective run is kept")
    points_per_centroid: int = Field(
        64, ge=39, le=256, description="k-means trains on a random sample of this many rows per centroid at most "
        "(FAISS's bounds: 39 to 256); every row is then assigned in a streaming pass")
    modality: Literal["image", "text", "both"] = Field(
        "both", description="spaces an external pair must pass in to be kept"
    )
    seed: int = 0


class AlignConfig(_Strict):
    """CSLS mutual nearest neighbours + iterative orthogonal Procrustes."""

    csls_k: int = Field(10, ge=1, description="neighbours in CSLS's hubness correction")
    max_rounds: int = Field(5, ge=1, description="refinement rounds (MUSE's default n_refinement is 5)")
    eps: float = Field(1e-4, gt=0, description="stop when ||W_r - W_(r-1)||_F < eps")
    criterion_pairs: int = Field(10_000, ge=1, description="top CSLS pairs averaged for model selection")
    block_size: int = Field(65_536, ge=1, description="rows per FAISS search block")
    init: Literal["auto", "identity", "similarity"] = Field(
        "auto", description="initial rotation: identity, similarity signatures (no shared space), or best"
    )
    max_rows: int | None = Field(
        50_000, ge=2, description="rows per side used to induce CSLS pairs (MUSE caps its dictionary too)"
    )
    proximal: float = Field(
        0.3, ge=0, description="pull of each Procrustes step towards the previous W (0: MUSE's plain step)"
    )
    pick: Literal["best", "last"] = Field(
        "best", description="W of the round with the best mean-cosine criterion, or of the last round (MUSE)"
    )
    seed: int = 0


class IndexConfig(_Strict):
    """FAISS indexes of the knowledge base: the kind from a byte budget per row, trained once on a random sample."""

    kind: Literal["auto", "flat", "ivf", "ivfpq", "hnsw"] = Field("auto",
        description="index type (auto: chosen by the KB's size)")
    flat_max_rows: int = Field(200_000, ge=1, description="auto: exact search up to this many rows (search speed)")
    bytes_per_row: int = Field(
        64, ge=8, description="auto, above flat_max_rows: FAISS code bytes per row and modality. IVF-Flat when the "
        "float32 vector fits (4 x dim), else IVF-PQ (OPQ-rotated when index.opq) with this many one-byte "
        "sub-quantisers (the largest divisor of the dimension that fits)")
    nlist: int | None = Field(None, ge=1, description="IVF lists; None: 2 * sqrt(rows)")
    hnsw_quantizer_min_lists: int = Field(
        4096, ge=1, description="from this many IVF lists the coarse quantiser is an HNSW graph (adding rows to a "
        "flat one costs rows x lists)")
    train_points_per_list: int = Field(
        64, ge=39, le=256, description="random training rows per IVF list (FAISS's k-means wants 39 to 256)")
    nprobe: int = Field(
        32, ge=1, description="IVF lists probed per query: the least the build tries (it doubles nprobe up to "
        "max_nprobe and keeps the least that reaches min_recall at some rerank depth)")
    max_nprobe: int = Field(
        256, ge=1, description="the most IVF lists the build tries per query (at 9.6M rows of IVF6196-PQ64, rerank "
        "depth 40: recall@10 0.68 at nprobe 32, 0.94 at 128 and at 256)")
    quantizer_ef_per_probe: int = Field(
        2, ge=1, description="an HNSW coarse quantiser's efSearch, per list probed (FAISS's default of 16 finds "
        "the nearest lists only approximately: at 9.6M rows, nprobe 128, depth 40, recall@10 0.93 -> 0.95)")
    pq_m: int | None = Field(None, ge=1, description="IVF-PQ sub-quantisers; None: from bytes_per_row")
    opq: bool = Field(False, description="IVF-PQ: learn an OPQ rotation first (better recall per byte, but its "
                      "training takes minutes per modality on a few cores)")
    hnsw_m: int = Field(32, ge=4)
    hnsw_ef_search: int = Field(128, ge=1)
    shards: int = Field(1, ge=1, description="index shards at least; each retrieval actor holds one")
    shard_rows: int = Field(
        10_000_000, ge=1, description="rows per index shard at most (one build task each); more rows, more shards")
    rerank_factor: int = Field(
        20, ge=1, description="approximate candidates per result, reranked exactly with the float16 vectors (at 495k "
        "rows of IVF-PQ64: recall@10 0.86 at 10, 0.94 at 20); the least the build tries")
    max_rerank_factor: int = Field(
        160, ge=1, description="the build doubles rerank_factor up to this, at each nprobe, and saves the pair it "
        "chose (more lists or a deeper rerank: slower queries, the same index)")
    min_recall: float = Field(
        0.9, ge=0, le=1, description="recall@10 against exact search measured at build time: below it even at "
        "max_nprobe and max_rerank_factor, the build warns and the report marks the index")
    recall_queries: int = Field(500, ge=10, description="held-out queries the build-time recall is measured on")

    @model_validator(mode="after")
    def _grid_bounds(self) -> IndexConfig:
        for least, most in (("nprobe", "max_nprobe"), ("rerank_factor", "max_rerank_factor")):
            if getattr(self, most) < getattr(self, least):
                raise ValueError(f"index.{most} ({getattr(self, most)}) must be at least index.{least} "
                                 f"({getattr(self, least)}): the build tries {least} doubling up to {most}")
        return self


class RetrievalConfig(_Strict):
    """Two-stage fusion retrieval (sim_fuse = alpha*cos(z_q, z_r) + (1-alpha)*cos(z_hat, z_r_other))."""

    mode: Literal["fusion", "intra", "cross", "mapped"] = Field(
        "fusion",
        description="fusion: intra-modal top-k then fused rerank; intra: stage 1 only; cross: the raw query "
        "against the other modality (shared space only); mapped: the pseudo-embedding against the other modality",
    )
    top_k: int = Field(20, ge=1, description="stage-1 intra-modal candidates")
    alpha: float = Field(0.5, ge=0, le=1,
        description="fusion weight of the intra-modal cosine (1 - alpha weighs the cross term)")
    n_results: int = Field(4, ge=1, description="reranked neighbours handed to generation")

    @model_validator(mode="after")
    def _results_within_k(self) -> RetrievalConfig:
        if self.n_results > self.top_k:
            raise ValueError(f"n_results ({self.n_results}) must not exceed top_k ({self.top_k})")
        return self


class SelectionConfig(_Strict):
    """Candidate selection: s_T = l1*cos + l2*BLEU (+ l3*sim_fuse), s_I = l1*cos - l2*NIQE (+ l3*sim_fuse)."""

    lambda_cos: float = Field(1.0, ge=0, description="weight of the cosine term in selection")
    lambda_quality: float = Field(0.1, ge=0,
        description="weight of BLEU (texts) / NIQE (images) in selection")
    lambda_retrieval: float = Field(
        0.0, ge=0, description="weight of the retrieval's fused score when a candidate is a retrieved KB entry "
        "(nearest-neighbour generators); 0 is the paper's score"
    )
    niqe_params: str | None = Field(
        None, description="NIQE parameter file (.npz or .mat); None: $RAG4DMC_NIQE_PARAMS, then the copy "
        "`rag4dmc setup` installs"
    )
    niqe_scale: float = Field(0.1, gt=0, description="NIQE is multiplied by this before weighting")
    image_quality: Literal["niqe", "none"] = Field(
        "niqe", description="none: rank image candidates by cosine only (no NIQE parameters needed)"
    )


class GeneratorConfig(_Strict):
    """Generators for each missing modality, with n candidates per query."""

    text_backend: Literal["nn", "blip2"] = Field("nn",
        description="image->text generator: nn (offline default: retrieved captions) or blip2")
    image_backend: Literal["nn", "sdxl"] = Field("nn",
        description="text->image generator: nn (offline default: retrieved images) or sdxl")
    n_candidates: int = Field(4, ge=1, description="candidates generated per row")
    blip2_model: str = Field("Salesforce/blip2-opt-2.7b",
        description="BLIP2 checkpoint: hub name, local path or s3://")
    sdxl_model: str = Field("stabilityai/stable-diffusion-xl-base-1.0",
        description="SDXL checkpoint: hub name, local path or s3://")
    model_dir: str | None = Field(None,
        description="folder with downloaded generator weights (no hub access)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "fp16", "bf16"] = "fp16"
    max_new_tokens: int = Field(30, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(0.9, gt=0, le=1)
    sdxl_mode: Literal["img2img", "text2img"] = "img2img"
    strength: float = Field(0.6, gt=0, le=1,
        description="SDXL img2img strength: how far from the retrieved image")
    steps: int = Field(30, ge=1)
    guidance_scale: float = Field(5.0, ge=0)
    image_size: int = Field(512, ge=8)
    image_format: Literal["png", "jpeg", "webp"] = Field("png", description="format of the generated images")
    batch_size: int = Field(8, ge=1)
    seed: int = 0


class StageResources(_Strict):
    """Resources of one actor pool; overrides an actor's own declaration field by field."""

    num_cpus: float | None = Field(None, gt=0)
    num_gpus: float | None = Field(None, ge=0)
    memory_gb: float | None = Field(None, gt=0)
    min_actors: int | None = Field(None, ge=1)
    max_actors: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1)
    seconds_per_row: float | None = Field(
        None, gt=0, description="one actor's seconds per row on its device, as a run measured it (summary.json's "
        "pools.<pool>.seconds_per_row): sizes the pools and the --dry-run estimates instead of the declared cost")


class ColumnsConfig(_Strict):
    id: str = Field("id", description="input column with the sample id")
    image: str = Field("image", description="input column with the image bytes or a path/URI")
    text: str = Field("text", description="input column with the text")
    label: str | None = Field(None, description="optional class label of a row (evaluation: label agreement)")


class StorageConfig(_Strict):
    """fsspec/s3fs options; None falls back to the usual AWS environment and config files."""

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint URL (None: the AWS settings)")
    key: str | None = Field(None, description="access key (None: the AWS environment or config)")
    secret: str | None = Field(None, description="secret key (None: the AWS environment or config)")
    region: str | None = Field(None, description="object-storage region")
    anon: bool = False
    retries: int = Field(5, ge=0, description="attempts for transient object-storage errors")
    example_cache_mb: int = Field(
        1024, ge=0, description="per-node disk cache of example images that completion fetched by reference")

    def fsspec_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"anon": self.anon}
        if self.key:
            opts["key"] = self.key
        if self.secret:
            opts["secret"] = self.secret
        client: dict[str, Any] = {}
        if self.endpoint_url:
            client["endpoint_url"] = self.endpoint_url
        if self.region:
            client["region_name"] = self.region
        if client:
            opts["client_kwargs"] = client
        opts["config_kwargs"] = {"retries": {"max_attempts": max(1, self.retries), "mode": "standard"}}
        return opts


class CalibrationConfig(_Strict):
    """Self-calibration at KB build (``rag4dmc.pipeline.kb.calibrate``): held-out internal pairs choose the settings.

    A slice of the internal complete pairs is hidden; each is completed from the rest (hide one modality,
    retrieve, select with the nearest-neighbour generator) at every point of the grids below, and the
    setting with the highest completion fidelity (cosine to the true other modality in the encoder's space,
    plus BLEU for texts) is kept, separately per direction. Purification (tau_cent / tau_inst, the
    alignment's proximal step and round) is chosen first, by the same fidelity at the configured retrieval
    settings; retrieval and selection are then chosen on the chosen knowledge base.
    """

    enabled: bool = Field(True,
        description="calibrate retrieval, selection and purification on held-out internal pairs at KB build")
    holdout_fraction: float = Field(0.15, gt=0, lt=1, description="share of internal pairs held out")
    min_holdout: int = Field(30, ge=4, description="held-out pairs at least (fewer internal pairs: no calibration)")
    max_holdout: int = Field(400, ge=4, description="held-out pairs at most: a bounded sample at any corpus size")
    max_rows: int = Field(
        100_000, ge=16, description="internal (and external) rows at most that the calibration's own knowledge base "
        "and mapping are built from, sampled at random: bounded work at any corpus size"
    )
    alpha: list[float] = Field([0.0, 0.25, 0.5, 0.75, 1.0], min_length=1)
    top_k: list[int] = Field([10, 20, 40], min_length=1)
    n_results: list[int] = Field([1, 2, 4, 8], min_length=1)
    lambda_quality: list[float] = Field([0.0, 0.1, 0.3], min_length=1)
    lambda_retrieval: list[float] = Field([0.0, 0.5, 2.0], min_length=1)
    tau_cent: list[float] = Field([0.3, 0.5, 0.7], min_length=1)
    tau_inst: list[float] = Field([0.1, 0.3, 0.5], min_length=1)
    align_proximal: list[float] = Field([0.0, 0.3], min_length=1)
    align_pick: list[Literal["best", "last"]] = Field(["best", "last"], min_length=1)
    bleu_weight: float = Field(1.0, ge=0, description="weight of BLEU against the true text in text fidelity")
    faithful_share: float = Field(
        0.95, gt=0, lt=1, description="a held-out completion is faithful when it is closer to the hidden truth "
        "than this share of the KB's entries is (README: Confidence); what `confidence` is the probability of")
    confidence_folds: int = Field(
        5, ge=2, description="folds of the confidence model's cross-fit: the reliability and ECE in the report are "
        "measured on held-out pairs the fold's model did not see")
    seed: int = 0

    @field_validator("alpha", "tau_cent", "tau_inst")
    @classmethod
    def _unit(cls, values: list[float]) -> list[float]:
        if any(not -1 <= v <= 1 for v in values):
            raise ValueError(f"values must lie in [-1, 1] (alpha in [0, 1]), got {values}")
        return values

    @field_validator("top_k", "n_results")
    @classmethod
    def _positive(cls, values: list[int]) -> list[int]:
        if any(v < 1 for v in values):
            raise ValueError(f"values must be at least 1, got {values}")
        return sorted(set(values))

    @model_validator(mode="after")
    def _grid(self) -> CalibrationConfig:
        if any(not 0 <= a <= 1 for a in self.alpha):
            raise ValueError(f"calibration.alpha values must lie in [0, 1], got {self.alpha}")
        if self.min_holdout > self.max_holdout:
            raise ValueError(f"min_holdout ({self.min_holdout}) exceeds max_holdout ({self.max_holdout})")
        return self


class BuildConfig(_Strict):
    """How the out-of-core KB build runs (pieces and task sizes); not what it builds."""

    piece_rows: int = Field(100_000, ge=1, description="rows a build task reads and processes at a time")
    task_cpus: float = Field(
        1.0, gt=0, description="CPUs each task of a parallel step (purify, index shards) reserves at least; an "
        "index step with fewer shards than the cluster has CPUs gives each shard's task more, up to a node")
    single_task_cpus: float | None = Field(
        None, gt=0, description="CPUs of the steps that run as one task (fit, index training); None: every CPU "
        "of the largest node (nothing else runs beside them)")


class KBConfig(_Strict):
    """Everything that decides the content of a purified knowledge base."""

    encoder: EncoderConfig = EncoderConfig()
    mapping: MappingConfig = MappingConfig()
    filter: FilterConfig = FilterConfig()
    align: AlignConfig = AlignConfig()
    index: IndexConfig = IndexConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    build: BuildConfig = BuildConfig()
    purify: bool = Field(True, description="False keeps the external corpus raw (ablation)")
    use_external: bool = True


class JobConfig(_Strict):
    """The ``rag4dmc complete`` job."""

    columns: ColumnsConfig = ColumnsConfig()
    storage: StorageConfig = StorageConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    generator: GeneratorConfig = GeneratorConfig()
    selection: SelectionConfig = SelectionConfig()
    resources: dict[str, StageResources] = Field(default_factory=dict)
    accelerators: Literal["auto", "gpu", "cpu"] = Field(
        "auto", description="auto: request GPUs if the cluster has any now; gpu: always (autoscaling GPU "
        "workers that start at zero); cpu: never"
    )
    min_confidence: float = Field(
        0.0, ge=0, le=1, description="a completed row whose confidence (the KB's calibrated probability that the "
        "completion is faithful) is below this gets status 'abstained' and no completion; 0: complete every row")
    shards_per_actor: int = Field(1, ge=1, description="knowledge-base shards each retrieval actor holds")
    census_shards: int = Field(
        4, ge=1, description="input shards read before the job starts to count the rows per direction, which "
        "share the cluster out between the directions' pools (and the --dry-run estimates)")
    block_rows: int = Field(
        256, ge=1, description="rows per block read from an input shard: the unit that flows through the stages "
        "and is committed to the output (smaller: output lands sooner and a kill loses less; larger: fewer files)"
    )
    task_seconds: float = Field(
        30.0, gt=0, description="a pool whose declared cost would keep one actor on a block longer than this gets "
        "its blocks split into tasks of about this many seconds (whole batches), so that all its actors share each "
        "block and the job's tail is short (SDXL: 12 rows a task); the output is still committed in block_rows")
    read_concurrency: int | None = Field(
        None, ge=1, description="read tasks at a time per branch; None: one per 16 cluster CPUs, at least one"
    )
    max_blocks_in_flight: int | None = Field(
        None, ge=1, description="blocks read but not yet committed, at most (what a kill can lose); None: "
        "enough to keep every actor pool fed twice over"
    )
    output_format: Literal["parquet", "webdataset"] = Field(
        "parquet", description="committed output files: parquet (one per block), or webdataset: one tar per block "
        "in img2dataset's layout (<key>.jpg|png|webp, <key>.txt, <key>.json); a run keeps the format it began with"
    )
    batch_timeout_s: float | None = Field(
        1800.0, gt=0, description="a stage's call on one batch that runs longer fails its rows with 'timed out "
        "after N s' and the job goes on (raise it for generation on CPU); None: no limit")
    transient_retries: int = Field(
        2, ge=0, description="retries of a batch whose stage raised a transient error (connection dropped, "
        "timeout), before its rows are retried one by one")
    retry_backoff_s: float = Field(1.0, ge=0, description="wait before the first retry; doubled for each next one")
    actor_restarts: int = Field(
        -1, ge=-1, description="restarts of an actor whose process died (preempted node, OOM kill); its batch "
        "is retried on the new one. -1: no limit")

    def config_hash(self) -> str:
        """Stable hash of what changes the output (resources, storage and fault handling do not)."""
        payload = self.model_dump(mode="json", exclude={
            "resources", "storage", "accelerators", "block_rows", "max_blocks_in_flight", "read_concurrency",
            "census_shards", "task_seconds",
            "output_format", "batch_timeout_s", "transient_retries", "retry_backoff_s", "actor_restarts"})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


ServeStage = Literal["ingress", "embed", "retrieve", "generate"]


class ServeConfig(_Strict):
    """The ``rag4dmc serve`` application (``deploy/app.py``); also the ``args`` of ``deploy/serve_config.yaml``.

    Retrieval, generation and selection take the job's keys (and flags), so an answer and a batch-job row
    made with the same settings carry the same ``config_hash``. Replica resources and ``@serve.batch`` sizes
    come from the actor classes' ``RESOURCES``, overridable per stage as in the job.
    """

    kb: str = Field(description="knowledge base folder or s3:// prefix built by `rag4dmc kb build`")
    storage: StorageConfig = StorageConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    generator: GeneratorConfig = GeneratorConfig()
    selection: SelectionConfig = SelectionConfig()
    resources: dict[ServeStage, StageResources] = Field(
        default_factory=dict, description="per deployment: replica resources, replica counts (min/max_actors) "
        "and batch_size (the largest @serve.batch)"
    )
    accelerators: Literal["auto", "gpu", "cpu"] = Field(
        "auto", description="auto: request GPUs if the cluster has any now; gpu: always; cpu: never"
    )
    api_key: SecretStr | None = Field(
        None, description="clients must send it in the x-api-key header (401 otherwise); None: no key needed"
    )
    max_upload_bytes: int = Field(
        16 * 1024**2, ge=1, description="largest request body (413 above); a base64 image takes 4/3 of its size"
    )
    max_text_chars: int = Field(2_000, ge=1, description="longest text accepted (400 above)")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, le=10, description="how long a @serve.batch call waits for more requests to fill the batch"
    )
    max_ongoing_requests: int = Field(
        64, ge=1, description="requests an ingress replica holds at once (each up to max_upload_bytes)"
    )
    request_timeout_s: float = Field(60.0, gt=0, description="a request not answered within this gets 504")
    upscale_delay_s: float = Field(
        30.0, ge=0, description="how long a deployment's requests in flight stay above its target before Serve adds "
        "a replica (Serve's default); lower it for bursty traffic"
    )
    downscale_delay_s: float = Field(
        600.0, ge=0, description="how long they stay below it before Serve removes one (Serve's default)"
    )
    max_queued_requests: int = Field(
        128, ge=1, description="requests each HTTP proxy holds waiting for an ingress replica once every replica has "
        "max_ongoing_requests; the next ones get 503 at once, with Retry-After (overload never hangs a client)"
    )
    retry_after_s: float = Field(
        1.0, ge=0, description="the Retry-After (seconds, rounded up) a 503 sends: overload, or a deployment "
        "still starting"
    )

    def job_config(self) -> JobConfig:
        """The batch job's config with the same output-deciding settings (its hash is the answers' config_hash)."""
        return JobConfig(storage=self.storage, retrieval=self.retrieval, generator=self.generator,
                         selection=self.selection, accelerators=self.accelerators)


VariantName = Literal["drop", "direct", "vanilla", "combined", "kfa", "rag4dmc", "rag4dmc_default",
                      "rag4dmc_confident", "complete"]
VARIANT_NAMES: tuple[str, ...] = get_args(VariantName)
SweepName = Literal["alpha", "k", "n", "lambda"]
# What each sweep name varies. n: the neighbours handed to generation, which the nearest-neighbour
# generator of the evaluation turns into the n candidates; lambda: the weight of BLEU / NIQE in selection.
SWEEP_KEYS: dict[str, str] = {"alpha": "retrieval.alpha", "k": "retrieval.top_k", "n": "retrieval.n_results",
                              "lambda": "selection.lambda_quality"}
WHOLE_NUMBER_SWEEPS = frozenset({"k", "n"})


class EvaluationConfig(_Strict):
    """How ``rag4dmc evaluate`` splits and masks the complete data, which variants run, what is swept."""

    missing_rates: list[float] = Field(
        [0.7], min_length=1, description="fractions of training rows that lose a modality; several give a plot"
    )
    image_loss_ratio: float = Field(0.5, ge=0, le=1, description="share of the masked rows that lose the image")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="held-out complete pairs for downstream recall")
    variants: list[VariantName] = Field(default_factory=lambda: list(VARIANT_NAMES), min_length=1,
        description="the variants to run")
    sweeps: dict[SweepName, list[float]] = Field(
        default_factory=dict, description="values of alpha / k / n / lambda to evaluate one at a time"
    )
    sweep_variant: VariantName = Field("rag4dmc", description="the variant evaluated at each swept value")
    examples: int = Field(4, ge=0, description="example completions per variant shown in the report")
    thumbnail_px: int = Field(128, ge=16, description="longest side of the report's example images")
    niqe_sample: int = Field(64, ge=1, description="completed images per variant scored with NIQE")
    confident_precision: float = Field(
        0.9, gt=0, le=1, description="RAG4DMC (confident) keeps completions at the lowest confidence threshold whose "
        "completions are faithful at this rate on the KB's held-out calibration pairs (never on the test split)")
    repeats: int = Field(5, ge=1, description="independent train/test splits and masks; means get 95% intervals "
                         "and variants paired differences (2 or more)")
    seed: int = Field(0, description="seed of the test split and the masking")

    @field_validator("missing_rates")
    @classmethod
    def _rates_open_interval(cls, rates: list[float]) -> list[float]:
        bad = [r for r in rates if not 0 < r < 1]
        if bad:
            raise ValueError(f"missing rates must be strictly between 0 and 1, got {bad}: a rate is the fraction "
                             "of training rows that lose a modality (0 leaves nothing to complete, 1 leaves no "
                             "complete pair to build the knowledge base from)")
        return list(dict.fromkeys(rates))

    @field_validator("variants")
    @classmethod
    def _variants_once(cls, variants: list[str]) -> list[str]:
        return list(dict.fromkeys(variants))

    @field_validator("sweeps")
    @classmethod
    def _sweep_values(cls, sweeps: dict[str, list[float]]) -> dict[str, list[float]]:
        for name, values in sweeps.items():
            if not values:
                raise ValueError(f"sweep {name} has no values: give them as {name}=V1,V2,...")
            if name in WHOLE_NUMBER_SWEEPS and any(v != int(v) for v in values):
                raise ValueError(f"sweep {name} ({SWEEP_KEYS[name]}) takes whole numbers, got {values}")
        return {name: list(dict.fromkeys(values)) for name, values in sweeps.items()}

    @field_validator("sweep_variant")
    @classmethod
    def _sweep_variant_retrieves(cls, name: str) -> str:
        if name in ("drop", "complete"):
            raise ValueError(f"{name} completes nothing, so sweeps cannot vary it: choose a retrieval variant")
        return name


class EvalConfig(KBConfig):
    """The ``rag4dmc evaluate`` command: the knowledge-base keys, retrieval and selection, and the evaluation."""

    columns: ColumnsConfig = ColumnsConfig()
    storage: StorageConfig = StorageConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    selection: SelectionConfig = SelectionConfig()
    evaluation: EvaluationConfig = EvaluationConfig()

    def kb_config(self) -> KBConfig:
        """The knowledge-base part (what ``rag4dmc kb build`` would take)."""
        return KBConfig(**{name: getattr(self, name) for name in KBConfig.model_fields})

    def swept(self, name: str, value: float) -> EvalConfig:
        """This config with the key behind sweep ``name`` set to ``value``."""
        section, key = SWEEP_KEYS[name].split(".")
        value = int(value) if name in WHOLE_NUMBER_SWEEPS else float(value)
        return self.model_copy(update={section: getattr(self, section).model_validate(
            getattr(self, section).model_dump() | {key: value})})

    @model_validator(mode="after")
    def _sweeps_give_valid_configs(self) -> EvalConfig:
        for name, values in self.evaluation.sweeps.items():
            for value in values:
                try:
                    self.swept(name, value)
                except ValidationError as exc:
                    why = "; ".join(str(e.get("ctx", {}).get("error", e["msg"])) for e in exc.errors())
                    raise ValueError(f"evaluation.sweeps.{name}={value:g} is not a valid {SWEEP_KEYS[name]} "
                                     f"with the other settings: {why}") from None
        return self


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file's mapping (empty for an empty file); any other top level is refused."""
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def load_yaml(path: str | Path, model: type[BaseModel]) -> BaseModel:
    """Read a YAML file into ``model``; the error names each offending key."""
    return validate(read_yaml(path), model, source=str(path))


def validate(data: dict[str, Any], model: type[BaseModel], source: str = "config") -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "<root>"
            lines.append(f"  {key}: {err['msg']}")
        raise ConfigError(f"invalid {source}:\n" + "\n".join(lines)) from None


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it."""
