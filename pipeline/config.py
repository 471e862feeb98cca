"""Every tunable of rag4dmc, as typed and validated objects in one place.

The YAML config of the CLI mirrors these models key for key: an unknown key or a bad value is an
error that names the key (pydantic's ``extra="forbid"`` and field constraints do the naming).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class EncoderConfig(_Strict):
    """Which frozen encoders embed images and texts (``actors.encoders.create_encoder``)."""

    backend: Literal["lite", "open_clip"] = "lite"
    model_name: str = Field("ViT-L-14", description="open_clip architecture name")
    pretrained: str | None = Field(
        None, description="open_clip pretrained tag (e.g. laion2b_s32b_b82k) or a local/s3:// checkpoint"
    )
    model_dir: str | None = Field(None, description="folder with downloaded weights (no hub access)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "fp16", "bf16"] = "fp16"
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
    max_epochs: int = Field(200, ge=1)
    patience: int = Field(10, ge=1, description="epochs without held-out improvement before stopping")
    val_fraction: float = Field(0.1, gt=0, lt=1)
    seed: int = 0


class FilterConfig(_Strict):
    """k-means cluster filtering of the external corpus against the internal one."""

    n_clusters_internal: int | None = Field(None, ge=1, description="None: about sqrt(n), at most 1024")
    n_clusters_external: int | None = Field(None, ge=1, description="None: about sqrt(n), at most 4096")
    tau_cent: float = Field(0.5, ge=-1, le=1, description="min cosine external->matched internal centroid")
    tau_inst: float = Field(0.3, ge=-1, le=1, description="min cosine instance->matched internal centroid")
    niter: int = Field(20, ge=1)
    nredo: int = Field(3, ge=1, description="k-means restarts; the lowest-objective run is kept")
    modality: Literal["image", "text", "both"] = Field(
        "both", description="spaces an external pair must pass in to be kept"
    )
    seed: int = 0


class AlignConfig(_Strict):
    """CSLS mutual nearest neighbours + iterative orthogonal Procrustes."""

    csls_k: int = Field(10, ge=1)
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
    seed: int = 0


class IndexConfig(_Strict):
    """FAISS indexes of the knowledge base."""

    kind: Literal["auto", "flat", "ivf", "ivfpq", "hnsw"] = "auto"
    flat_max_rows: int = Field(200_000, ge=1, description="auto: exact search up to this many rows")
    pq_min_rows: int = Field(20_000_000, ge=1, description="auto: IVF-PQ from this many rows, IVF-Flat below")
    nlist: int | None = Field(None, ge=1, description="IVF lists; None: 4*sqrt(n)")
    nprobe: int = Field(32, ge=1)
    pq_m: int = Field(32, ge=1, description="IVF-PQ sub-quantisers (must divide the dimension)")
    hnsw_m: int = Field(32, ge=4)
    hnsw_ef_search: int = Field(128, ge=1)
    shards: int = Field(1, ge=1, description="index shards; each retrieval actor holds one")
    rerank_factor: int = Field(4, ge=1, description="approximate candidates per result, reranked exactly")


class RetrievalConfig(_Strict):
    """Two-stage fusion retrieval (sim_fuse = alpha*cos(z_q, z_r) + (1-alpha)*cos(z_hat, z_r_other))."""

    mode: Literal["fusion", "intra", "cross", "mapped"] = Field(
        "fusion",
        description="fusion: intra-modal top-k then fused rerank; intra: stage 1 only; cross: the raw query "
        "against the other modality (shared space only); mapped: the pseudo-embedding against the other modality",
    )
    top_k: int = Field(20, ge=1, description="stage-1 intra-modal candidates")
    alpha: float = Field(0.5, ge=0, le=1)
    n_results: int = Field(4, ge=1, description="reranked neighbours handed to generation")

    @model_validator(mode="after")
    def _results_within_k(self) -> RetrievalConfig:
        if self.n_results > self.top_k:
            raise ValueError(f"n_results ({self.n_results}) must not exceed top_k ({self.top_k})")
        return self


class SelectionConfig(_Strict):
    """Candidate selection: s_T = l1*cos + l2*BLEU, s_I = l1*cos - l2*NIQE."""

    lambda_cos: float = Field(1.0, ge=0)
    lambda_quality: float = Field(0.1, ge=0)
    niqe_params: str | None = Field(
        None, description="NIQE parameter file (.npz or .mat); required when images are scored with NIQE"
    )
    niqe_scale: float = Field(0.1, gt=0, description="NIQE is multiplied by this before weighting")
    image_quality: Literal["niqe", "none"] = Field(
        "niqe", description="none: rank image candidates by cosine only (no NIQE parameters needed)"
    )


class GeneratorConfig(_Strict):
    """Generators for each missing modality, with n candidates per query."""

    text_backend: Literal["nn", "blip2"] = "nn"
    image_backend: Literal["nn", "sdxl"] = "nn"
    n_candidates: int = Field(4, ge=1)
    blip2_model: str = "Salesforce/blip2-opt-2.7b"
    sdxl_model: str = "stabilityai/stable-diffusion-xl-base-1.0"
    model_dir: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "fp16", "bf16"] = "fp16"
    max_new_tokens: int = Field(30, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(0.9, gt=0, le=1)
    sdxl_mode: Literal["img2img", "text2img"] = "img2img"
    strength: float = Field(0.6, gt=0, le=1)
    steps: int = Field(30, ge=1)
    guidance_scale: float = Field(5.0, ge=0)
    image_size: int = Field(512, ge=8)
    image_format: Literal["png", "jpeg", "webp"] = "png"
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


class ColumnsConfig(_Strict):
    id: str = "id"
    image: str = "image"
    text: str = "text"


class StorageConfig(_Strict):
    """fsspec/s3fs options; None falls back to the usual AWS environment and config files."""

    endpoint_url: str | None = None
    key: str | None = None
    secret: str | None = None
    region: str | None = None
    anon: bool = False
    retries: int = Field(5, ge=0, description="attempts for transient object-storage errors")

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


class KBConfig(_Strict):
    """Everything that decides the content of a purified knowledge base."""

    encoder: EncoderConfig = EncoderConfig()
    mapping: MappingConfig = MappingConfig()
    filter: FilterConfig = FilterConfig()
    align: AlignConfig = AlignConfig()
    index: IndexConfig = IndexConfig()
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
    shards_per_actor: int = Field(1, ge=1, description="knowledge-base shards each retrieval actor holds")

    def config_hash(self) -> str:
        """Stable hash of what changes the output (resources and storage do not)."""
        payload = self.model_dump(mode="json", exclude={"resources", "storage", "accelerators"})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def load_yaml(path: str | Path, model: type[BaseModel]) -> BaseModel:
    """Read a YAML file into ``model``; the error names each offending key."""
    import yaml

    text = Path(path).read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return validate(data, model, source=str(path))


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
