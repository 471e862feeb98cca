"""``rag4dmc kb build``: embeddings of both sides in the clip-retrieval layout, then the out-of-core build.

Each side (internal, external) is either given as precomputed embeddings (``--internal-embeddings`` /
``--external-embeddings``: a clip-retrieval layout folder, local or ``s3://``) or embedded here from its
images and texts by a resumable streaming stage: Ray Data reads the dataset's complete pairs, decodes and
embeds them with the encoder's actor pool, and :class:`LayoutSink` writes them as layout shards under
``KB/embeddings/<side>/`` (metadata: id, caption, url, and the input shard and row of images held as bytes).
Nothing but counts reaches the driver, and a rerun skips the rows already written. ``rag4dmc.pipeline.kb.build``
then fits, purifies and indexes out of core.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasink

from rag4dmc.actors.embed import EmbedPairs
from rag4dmc.actors.preprocess import CPU_TASK, FetchAndDecode
from rag4dmc.actors.resources import use_gpus
from rag4dmc.actors.stage import check_chain, run_stage
from rag4dmc.pipeline.config import ColumnsConfig, KBConfig, StageResources, StorageConfig
from rag4dmc.pipeline.io import embedding_layout as layout
from rag4dmc.pipeline.io.datasets import list_shards
from rag4dmc.pipeline.io.storage import Storage, url_to_fs
from rag4dmc.pipeline.job.reader import ROW_KEY, ShardDatasource, committed_keys, shard_name
from rag4dmc.pipeline.job.stage_actor import actor_class
from rag4dmc.pipeline.kb import build, build_sides
from rag4dmc.pipeline.schema import INPUT_SCHEMA, TASK_FAILED, TASK_OBSERVED

log = logging.getLogger(__name__)

EMBEDDINGS_DIR = "embeddings"  # KB/embeddings/<side>/: the layout of the sides this build embedded
EMBED_TASK_SLOTS = 3  # tasks that must run beside the embedding pool: a read, a decode, the layout write
ROWS_PER_PART = 10_000  # rows per layout shard the embedding stage writes (Ray Data bundles blocks up to it)
SHARD_DIGITS, ROW_DIGITS = 12, 9  # a part's number: a hash of its input shard's name, then its first row


@dataclass
class KBBuildSpec:
    internal: str | None
    out: str
    external: str | None = None
    internal_embeddings: str | None = None  # a clip-retrieval layout instead of embedding ``internal``
    external_embeddings: str | None = None
    cfg: KBConfig = KBConfig()
    columns: ColumnsConfig = ColumnsConfig()
    storage: StorageConfig = StorageConfig()
    data_format: str = "auto"
    embed_resources: StageResources | None = None
    accelerators: str = "auto"  # as JobConfig.accelerators: auto, gpu or cpu


def shard_code(name: str) -> str:
    """A stable number for an input shard (its name hashed): a shard added to the input changes no other's."""
    return f"{int(hashlib.sha1(name.encode()).hexdigest(), 16) % 10**SHARD_DIGITS:0{SHARD_DIGITS}d}"


def part_number(name: str, first_row: int) -> str:
    """The layout number of a part: unique, since the parts of one input shard hold disjoint rows."""
    return f"{shard_code(name)}{first_row:0{ROW_DIGITS}d}"


class LayoutSink(Datasink):
    """Ray Data sink of embedded pairs: each write's rows of each input shard become one layout shard."""

    def __init__(self, dest: str, shard_uri: dict[str, str], storage_options: dict | None,
                 rows_per_part: int = ROWS_PER_PART):
        self.dest, self.shard_uri = dest, shard_uri
        self.storage_options, self.rows_per_part = storage_options, rows_per_part
        self.written = self.failed = 0  # summed on the driver when the writes are done

    def get_name(self) -> str:
        return "WriteEmbeddings"

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_part

    def write(self, blocks, ctx) -> dict:
        written = failed = 0
        for block in blocks:
            table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block)
            ok = np.asarray(table.column("task").to_pylist(), dtype=object) == TASK_OBSERVED
            failed += int((~ok).sum())
            table = table.filter(pa.array(ok))
            names = table.column("source_shard").to_pylist()
            for name in dict.fromkeys(names):
                part = table.filter(pa.array([n == name for n in names]))
                written += self._write_part(name, part)
        return {"written": written, "failed": failed}

    def on_write_complete(self, write_result) -> None:
        returns = [r for r in getattr(write_result, "write_returns", write_result) if isinstance(r, dict)]
        self.written = sum(r["written"] for r in returns)
        self.failed = sum(r["failed"] for r in returns)

    def _write_part(self, name: str, part: pa.Table) -> int:
        keys = part.column(ROW_KEY).to_pylist()
        rows = [int(k.rsplit(":", 1)[1]) for k in keys]
        uris = part.column("image_uri").to_pylist()
        meta = pa.table({
            "id": part.column("id").cast(pa.string()), "caption": part.column("text").cast(pa.string()),
            "url": pa.array(uris, pa.string()),
            # An image held as bytes in the input is found again by its shard and row (never copied).
            "image_shard": pa.array([None if u else self.shard_uri[name] for u in uris], pa.string()),
            "image_row": pa.array([None if u else r for u, r in zip(uris, rows)], pa.int64()),
            ROW_KEY: pa.array(keys, pa.string())})
        image = np.stack(part.column("image_emb").to_numpy(zero_copy_only=False))
        text = np.stack(part.column("text_emb").to_numpy(zero_copy_only=False))
        layout.write_embedding_shard(self.dest, part_number(name, min(rows)), image, text, meta, self.storage_options)
        return part.num_rows


def committed_rows(dest: str, name: str, storage_options: dict | None) -> set[str]:
    """Row keys of input shard ``name`` already written to the layout at ``dest`` (read in that shard's read
    task, from that shard's parts only: the cost of resuming does not grow with the rest of the corpus)."""
    fs, path = url_to_fs(f"{dest}/{layout.METADATA_DIR}", storage_options)
    if not fs.exists(path):
        return set()

    def read_keys(f: str) -> list[str]:
        with fs.open(f, "rb") as fh:
            return pq.read_table(fh, columns=[ROW_KEY]).column(ROW_KEY).to_pylist()

    return committed_keys(fs.glob(f"{path}/metadata_{shard_code(name)}*.parquet"), read_keys, name)


def embed_pool(declared, spec: KBBuildSpec):
    """The KB build's embedding pool: the encoder's declaration with the user's override, as large as the cluster
    (now, and what its autoscaler may add) holds beside the read, decode and write tasks (``rag4dmc.pipeline.job.scaling``)."""
    from rag4dmc.actors.resources import fit_to_cpus
    from rag4dmc.pipeline.job.scaling import Pool, read_capacity, size_pools

    override = spec.embed_resources
    res = declared.with_overrides(override).for_gpu(use_gpus(spec.accelerators))
    capacity = read_capacity()
    reserved = EMBED_TASK_SLOTS * CPU_TASK.num_cpus
    (res,) = size_pools({"embed_pairs": Pool(res, fixed=override is not None and override.max_actors is not None)},
                        capacity, reserved).values()
    log.info("embedding pool: %d..%d actors on %s", res.min_actors, res.max_actors, capacity.describe())
    return fit_to_cpus([res], capacity.cpus_now - reserved)[0]


def embed_to_layout(path: str, dest: str, spec: KBBuildSpec, storage: Storage) -> dict:
    """Complete pairs of the dataset at ``path``, embedded, written as layout shards to ``dest``; counts only."""
    import ray

    from rag4dmc.actors.encoders import encoder_image_size

    enc = spec.cfg.encoder
    cpu = {"num_cpus": CPU_TASK.num_cpus, "batch_size": CPU_TASK.batch_size, "batch_format": "numpy"}
    decode = FetchAndDecode(encoder_image_size(enc), enc.max_image_pixels, storage.options, tasks=(TASK_OBSERVED,))
    embed = EmbedPairs(enc)
    check_chain([decode, embed], source=INPUT_SCHEMA.names)
    res = embed_pool(embed.RESOURCES, spec)
    shards = list_shards(path, storage.options, spec.data_format)
    root = path.rstrip("/")
    names = {shard_name(s, root): s for s in shards}
    layout.remove_incomplete(dest, storage.options)  # vectors of a part whose metadata was never written
    before = layout.total_rows(layout.list_embedding_shards(dest, storage.options)) \
        if layout.written_numbers(dest, storage.options) else 0
    opts = storage.options
    # Only complete pairs (and rows failed at read, to count them) are read: half-rows are not KB entries.
    source = ShardDatasource(path, spec.columns, opts, spec.data_format, shards=shards,
                             tasks=(TASK_OBSERVED, TASK_FAILED), committed=lambda name: committed_rows(dest, name, opts))
    ds = ray.data.read_datasource(source, num_cpus=CPU_TASK.num_cpus)
    ds = ds.map_batches(run_stage, fn_kwargs={"stage": decode}, **cpu)
    ds = ds.map_batches(actor_class(embed), fn_constructor_kwargs={"stage": embed}, batch_format="numpy",
                        **res.map_batches_kwargs())
    sink = LayoutSink(dest, names, storage.options)
    ds.write_datasink(sink)
    return {"rows": before + sink.written, "resumed_rows": before, "skipped": sink.failed}


def side_layout(side: str, data: str | None, embeddings: str | None, spec: KBBuildSpec, storage: Storage) -> tuple[
        str | None, dict]:
    """The layout folder of one side: the given embeddings, or this build's own embedding of ``data``."""
    if embeddings:
        return embeddings.rstrip("/"), {"precomputed": embeddings}
    if not data:
        return None, {}
    dest = f"{spec.out.rstrip('/')}/{EMBEDDINGS_DIR}/{side}"
    counts = embed_to_layout(data, dest, spec, storage)
    log.info("%s: %d pairs embedded to %s (%d from an earlier run)", side, counts["rows"], dest,
             counts["resumed_rows"])
    return dest, counts


def run_kb_build(spec: KBBuildSpec) -> dict:
    """Build the purified knowledge base and save it to ``spec.out``; returns its version, rows and report."""
    import ray

    from rag4dmc.actors.encoders import describe_encoder

    if not (spec.internal or spec.internal_embeddings):
        raise ValueError("kb build needs the internal pairs: --internal DATA or --internal-embeddings DIR")
    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    storage = Storage(spec.storage)
    internal, int_counts = side_layout(build_sides.INTERNAL, spec.internal, spec.internal_embeddings, spec, storage)
    external, ext_counts = (None, {})
    if spec.cfg.use_external:
        external, ext_counts = side_layout(build_sides.EXTERNAL, spec.external, spec.external_embeddings, spec, storage)
    encoder = describe_encoder(spec.cfg.encoder)
    inputs = build.BuildInputs(
        internal=internal, external=external, out=spec.out.rstrip("/"), dims=(encoder["image_dim"], encoder["text_dim"]),
        encoder_info=encoder, storage_options=storage.options, columns=spec.columns.model_dump(),
        report={"embedding": {"internal": int_counts, "external": ext_counts},
                "skipped_rows": {"internal": int_counts.get("skipped", 0), "external": ext_counts.get("skipped", 0)}})
    if internal is None:
        raise ValueError(f"no internal pairs found at {spec.internal}")
    return build.build(inputs, spec.cfg)
