"""``rag4dmc kb build``: embed internal and external pairs with actor pools, then build and save the KB."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from actors.embed import EmbedPairs
from actors.preprocess import CPU_TASK, FetchAndDecode
from actors.resources import use_gpus
from actors.stage import check_chain
from pipeline import kb as kbmod
from pipeline.config import ColumnsConfig, KBConfig, StageResources, StorageConfig
from pipeline.datasource import ShardDatasource
from pipeline.plan import actor_class, stage_task
from pipeline.schema import INPUT_SCHEMA, TASK_FAILED, TASK_OBSERVED
from pipeline.storage import Storage

log = logging.getLogger(__name__)


@dataclass
class KBBuildSpec:
    internal: str
    out: str
    external: str | None = None
    cfg: KBConfig = KBConfig()
    columns: ColumnsConfig = ColumnsConfig()
    storage: StorageConfig = StorageConfig()
    data_format: str = "auto"
    embed_resources: StageResources | None = None
    accelerators: str = "auto"  # as JobConfig.accelerators: auto, gpu or cpu


def embed_pairs(path: str, spec: KBBuildSpec, storage: Storage) -> tuple[pa.Table, dict[str, np.ndarray], int]:
    """Complete pairs of the dataset at ``path`` with their embeddings; also the number of rows skipped."""
    import ray

    from actors.encoders import encoder_image_size

    enc = spec.cfg.encoder
    cpu = {"num_cpus": CPU_TASK.num_cpus, "batch_size": CPU_TASK.batch_size, "batch_format": "numpy"}
    decode = FetchAndDecode(encoder_image_size(enc), enc.max_image_pixels, storage.options, tasks=(TASK_OBSERVED,))
    embed = EmbedPairs(enc)
    check_chain([decode, embed], source=INPUT_SCHEMA.names)
    res = embed.RESOURCES.with_overrides(spec.embed_resources).for_gpu(use_gpus(spec.accelerators))
    # Only complete pairs (and rows failed at read, to count them) are read: half-rows are not KB entries.
    source = ShardDatasource(path, spec.columns, storage.options, spec.data_format,
                             tasks=(TASK_OBSERVED, TASK_FAILED))
    ds = ray.data.read_datasource(source, num_cpus=CPU_TASK.num_cpus)
    ds = ds.map_batches(stage_task, fn_kwargs={"stage": decode}, **cpu)
    ds = ds.map_batches(actor_class(embed), fn_constructor_kwargs={"stage": embed}, batch_format="numpy",
                        **res.map_batches_kwargs())
    entries, images, texts, skipped = [], [], [], 0
    for batch in ds.iter_batches(batch_format="numpy", batch_size=4096):
        ok = np.asarray(batch["task"], dtype=object) == TASK_OBSERVED
        skipped += int((~ok).sum())
        entries.append(pa.table({"id": list(batch["id"][ok]), "text": list(batch["text"][ok]),
                                 "image": [bytes(b) for b in batch["image"][ok]]}))
        images.append(np.asarray(batch["image_emb"])[ok])
        texts.append(np.asarray(batch["text_emb"])[ok])
    if not entries:
        return pa.table({"id": [], "text": [], "image": []}), {"image": np.zeros((0, 1)), "text": np.zeros((0, 1))}, 0
    return pa.concat_tables(entries), {"image": np.concatenate(images), "text": np.concatenate(texts)}, skipped


def run_kb_build(spec: KBBuildSpec) -> dict:
    """Build the purified knowledge base and save it to ``spec.out``; returns its manifest and report."""
    import ray

    from actors.encoders import describe_encoder

    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    storage = Storage(spec.storage)
    internal_entries, internal, skipped_int = embed_pairs(spec.internal, spec, storage)
    if internal_entries.num_rows < 4:
        raise ValueError(f"{spec.internal} has {internal_entries.num_rows} complete image-text pairs; "
                         "the mapping needs at least 4 (the internal part of the KB is the complete pairs)")
    external_entries, external, skipped_ext = (None, None, 0)
    if spec.external and spec.cfg.use_external:
        external_entries, external, skipped_ext = embed_pairs(spec.external, spec, storage)
    log.info("embedded %d internal and %d external pairs", internal_entries.num_rows,
             0 if external_entries is None else external_entries.num_rows)
    kb = kbmod.build_knowledge_base(internal_entries, internal, external_entries, external, spec.cfg,
                                    encoder_info=describe_encoder(spec.cfg.encoder))
    kb.report["skipped_rows"] = {"internal": skipped_int, "external": skipped_ext}
    kbmod.save(kb, spec.out, storage.options)
    return {"version": kb.version, "rows": len(kb), "report": kb.report, "out": spec.out}
