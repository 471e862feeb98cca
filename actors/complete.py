"""Generation and selection stages: n candidates per row, scored inside the actor, the best one kept.

Candidates never travel back to the driver: each actor generates, embeds and scores its candidates
(s_T = l1*cos + l2*BLEU, s_I = l1*cos - l2*NIQE) and emits only the chosen completion with the
candidate scores for provenance. With the nearest-neighbour generator the candidates are knowledge-base
entries, so their cosine to the pseudo-embedding is the retrieval's cross term and no encoder runs.
"""

from __future__ import annotations

import json
import logging
import zlib

import numpy as np
import pyarrow as pa

from rag4dmc.actors.factory import create_image_generator, create_text_generator
from rag4dmc.actors.generators import Example
from rag4dmc.actors.images import InputError, encode_image, load_image
from rag4dmc.actors.niqe import NiqeScorer
from rag4dmc.actors.resources import Resources
from rag4dmc.actors.stage import Column, Produced, Stage, object_column
from rag4dmc.pipeline.config import ColumnsConfig, EncoderConfig, GeneratorConfig, SelectionConfig
from rag4dmc.pipeline.core.confidence import ConfidenceModel, completion_features, predict
from rag4dmc.pipeline.core.selection import (
    candidate_cosines,
    select_image,
    select_text,
    wants_niqe,
)
from rag4dmc.pipeline.io.kb_images import DEFAULT_CACHE_MB, ExampleImages
from rag4dmc.pipeline.kb import store as kb_store
from rag4dmc.pipeline.schema import STATUS_ABSTAINED, STATUS_COMPLETED, TASK_I2T, TASK_T2I

log = logging.getLogger(__name__)


def completion_batch(task: str, row_keys, texts, images, ids: np.ndarray, fused: np.ndarray, cross: np.ndarray,
                     pseudo: np.ndarray, **extra) -> dict[str, np.ndarray]:
    """The batch the completion stages (``CompleteTexts``, ``CompleteImages``) take, for callers outside the job's
    plan (the evaluation, the service): one row per key, what it observed (``texts`` / ``images``, None where
    absent), its retrieval (neighbour ids, fused and cross scores: ``[n, k]``) and its pseudo-embedding; ``extra``
    columns ride along."""
    n = len(row_keys)
    return {"row_key": object_column(row_keys), "task": object_column([task] * n),
            "error": object_column([None] * n), "text": object_column(texts), "image": object_column(images),
            "ret_ids": np.asarray(ids), "ret_fused": np.asarray(fused), "ret_cross": np.asarray(cross),
            "pseudo": np.asarray(pseudo), **extra}


def batch_seed(base: int, row_keys) -> int:
    """A seed fixed by the rows in the batch, so reruns of the same batch draw the same candidates."""
    return (base + zlib.crc32("|".join(map(str, row_keys)).encode())) % 2**31


OUTPUT_COLUMNS = (Column("generated"), Column("status"), Column("generator"), Column("retrieved_ids"),
                  Column("fusion_scores"), Column("candidates"), Column("candidate_ids"), Column("candidate_scores"),
                  Column("chosen", -1, np.int32), Column("confidence", np.nan, np.float32), Column("settings"),
                  Column("skipped_examples"))


class _Complete(Stage):
    """Shared part of the two completion stages: the retrieved examples, provenance, the declarations."""

    name, accounts = "generate", "generate"
    generated: str  # the modality this stage writes: "text" or "image"

    def __init__(self, generator: GeneratorConfig, selection: SelectionConfig, encoder: EncoderConfig,
                 entries: pa.Table | str, nn: bool, storage_options: dict | None = None, settings: dict | None = None,
                 example_cache_mb: int = DEFAULT_CACHE_MB, confidence: dict | None = None,
                 min_confidence: float = 0.0):
        self.gcfg, self.scfg, self.ecfg, self.nn = generator, selection, encoder, nn
        # The KB's confidence model of this direction (None: the KB has none; rows get NaN) and the threshold
        # below which a completed row abstains (``JobConfig.min_confidence``).
        self.confidence = None if confidence is None else ConfidenceModel.from_dict(confidence)
        self.min_confidence = min_confidence
        if min_confidence > 0 and self.confidence is None:
            raise ValueError(f"min_confidence is {min_confidence:g} but the knowledge base has no confidence model "
                             f"for {self.tasks[0]}: rebuild it with calibration on (at least "
                             "calibration.min_holdout internal pairs), or leave min_confidence at 0")
        self.entries_source, self.storage_options = entries, storage_options
        self.example_cache_mb = example_cache_mb
        # The retrieval and selection settings this direction runs with, and where they came from (calibrated
        # at KB build, set by the user, or defaults): every completed row carries them as provenance.
        self.settings = json.dumps(settings, sort_keys=True) if settings else None
        self.max_pixels = encoder.max_image_pixels
        observed = "image" if self.generated == "text" else "text"
        self.reads = (observed, "ret_ids", "ret_fused", "ret_cross", "pseudo")
        self.writes = (Column(self.generated), *OUTPUT_COLUMNS)
        self.drops = ("query", "pseudo", "ret_ids", "ret_fused", "ret_cross")

    def setup(self) -> None:
        self.encoder = None
        if not self.nn:
            from rag4dmc.actors.factory import create_encoder

            self.encoder = create_encoder(self.ecfg, towers=(self.generated,))  # it embeds its candidates
        # A KB URI (the job's actors): its entries file memory-mapped, so an actor reads only the rows its
        # queries retrieve, however large the KB. A table: entries already in this process (tests, evaluation).
        src = self.entries_source
        self.entries = src if isinstance(src, pa.Table) else kb_store.load_entries(src, self.storage_options)
        columns = ColumnsConfig() if isinstance(src, pa.Table) else kb_store.input_columns(src, self.storage_options)
        self.images = ExampleImages(self.storage_options, self.example_cache_mb * 2**20, columns=columns)

    def examples(self, ids: np.ndarray, scores: np.ndarray, cross: np.ndarray) -> list[list[Example]]:
        """The retrieved KB entries of each row (ids < 0 are padding), gathered in one take for the batch."""
        keep = np.asarray(ids) >= 0
        rows = kb_store.take_entries(self.entries, np.asarray(ids, dtype=np.int64)[keep])
        out, at = [], 0
        for s, c, k in zip(scores, cross, keep):
            sc, cr = np.asarray(s)[k], np.asarray(c)[k]
            out.append([Example(id=rows["id"][at + j], text=rows["text"][at + j] or "",
                                image=None, score=float(sc[j]),
                                cross=float(cr[j]), fetch=self._fetcher(rows, at + j))
                        for j in range(len(sc))])
            at += len(sc)
        return out

    def _fetcher(self, rows: dict, i: int):
        """Fetches entry ``i``'s image by reference when (if) a generator asks for it."""
        uri, shard, row = (rows.get(c, [None] * (i + 1))[i] for c in ("image_uri", "image_shard", "image_row"))
        return lambda: self.images.get(uri, shard, row)

    def process(self, rows):
        m = len(rows["row_key"])
        found = self.examples(rows["ret_ids"], rows["ret_fused"], rows["ret_cross"])
        cols = {c.name: [c.fill] * m for c in self.writes}
        errors: list[str | None] = [None] * m
        for j, ex in enumerate(found):
            cols["retrieved_ids"][j] = [e.id for e in ex]
            cols["fusion_scores"][j] = [e.score for e in ex]
            cols["settings"][j] = self.settings
            cols["generated"][j], cols["status"][j] = self.generated, STATUS_COMPLETED
            if not ex:
                errors[j] = "the knowledge base returned no neighbours for this row"
        work = [j for j in range(m) if errors[j] is None]
        if work:
            self.complete(rows, work, found, cols, errors)
            self.rate([j for j in work if errors[j] is None], found, cols)
        for j, ex in enumerate(found):  # examples whose image could not be had, and why
            skipped = [f"{e.id}: {e.problem}" for e in ex if e.problem]
            cols["skipped_examples"][j] = skipped or None
        cols["chosen"] = np.asarray(cols["chosen"], np.int32)
        return Produced(cols, errors)

    def rate(self, done: list[int], found: list[list[Example]], cols: dict) -> None:
        """Each completed row's confidence (the KB's model on its retrieval and selection scores); a row below
        ``min_confidence`` abstains: status "abstained", its completion left to the provenance (``candidates`` /
        ``candidate_ids`` with ``chosen``), not in the completed column."""
        if self.confidence is None or not done:
            return
        x = np.stack([completion_features([e.score for e in found[j]], [e.cross for e in found[j]],
                                          cols["candidate_scores"][j], cols["chosen"][j]) for j in done])
        for j, p in zip(done, predict(self.confidence, x)):
            cols["confidence"][j] = float(p)
            if p < self.min_confidence:
                cols["status"][j], cols[self.generated][j] = STATUS_ABSTAINED, None

    def n_candidates(self, found: list[list[Example]]) -> int:
        """Candidates per row: a generator's n samples, or for the nearest-neighbour generator every retrieved
        example (``retrieval.n_results``, which the calibration chooses)."""
        return max(len(ex) for ex in found) if self.nn else self.gcfg.n_candidates

    def complete(self, rows, work, found, cols, errors) -> None:
        raise NotImplementedError


class CompleteTexts(_Complete):
    """Image -> text: caption candidates (BLIP2, or the neighbours' texts), scored with cosine + BLEU."""

    generated = "text"
    tasks = (TASK_I2T,)

    def __init__(self, generator: GeneratorConfig, selection: SelectionConfig, encoder: EncoderConfig,
                 entries: pa.Table | str, storage_options: dict | None = None, settings: dict | None = None,
                 example_cache_mb: int = DEFAULT_CACHE_MB, confidence: dict | None = None,
                 min_confidence: float = 0.0):
        super().__init__(generator, selection, encoder, entries, nn=generator.text_backend == "nn",
                         storage_options=storage_options, settings=settings, example_cache_mb=example_cache_mb,
                         confidence=confidence, min_confidence=min_confidence)
        from rag4dmc.actors.factory import text_generator_class

        self.RESOURCES = text_generator_class(generator).RESOURCES

    def setup(self) -> None:
        super().setup()
        self.generator = create_text_generator(self.gcfg)

    @staticmethod
    def resources(generator: GeneratorConfig) -> Resources:
        from rag4dmc.actors.factory import text_generator_class

        return text_generator_class(generator).RESOURCES

    def complete(self, rows, work, found, cols, errors) -> None:
        queries, ok = [], []
        for j in work:
            try:
                queries.append(None if self.nn else load_image(rows["image"][j], max_pixels=self.max_pixels))
                ok.append(j)
            except InputError as exc:
                errors[j] = str(exc)
        if not ok:
            return
        examples = [found[j] for j in ok]
        n = self.n_candidates(examples)
        seed = batch_seed(self.gcfg.seed, [rows["row_key"][j] for j in ok])
        if self.nn:  # candidates are the neighbours: cos(E_T(c), z_hat_T) is each one's retrieval cross term
            cands = self.generator.generate_indexed(queries, examples, n, seed)
        else:
            cands = [[(None, c) for c in cand] for cand in self.generator.generate(queries, examples, n, seed)]
        for j, ex, cand in zip(ok, examples, cands):
            cand = [(i, c) for i, c in cand if isinstance(c, str) and c.strip()]
            if not cand:
                errors[j] = f"{self.generator.name} produced no usable caption"
                continue
            texts = [c for _, c in cand]
            if self.nn:
                picked = [ex[i] for i, _ in cand]
                scores = select_text(texts, np.array([e.cross for e in picked], np.float32), self.scfg,
                                     fused=np.array([e.score for e in picked], np.float32))
                cols["candidate_ids"][j] = [e.id for e in picked]
            else:
                cos = candidate_cosines(self.encoder.encode_texts(texts), rows["pseudo"][j])
                scores = select_text(texts, cos, self.scfg, reference=ex[0].text)
            best = int(np.argmax(scores))
            cols["text"][j] = texts[best]
            cols["generator"][j] = self.generator.name
            cols["candidates"][j] = texts
            cols["candidate_scores"][j] = [float(s) for s in scores]
            cols["chosen"][j] = best


class CompleteImages(_Complete):
    """Text -> image: image candidates (SDXL, or the neighbours' images), scored with cosine - NIQE."""

    generated = "image"
    tasks = (TASK_T2I,)

    def __init__(self, generator: GeneratorConfig, selection: SelectionConfig, encoder: EncoderConfig,
                 entries: pa.Table | str, storage_options: dict | None = None, settings: dict | None = None,
                 niqe=None, example_cache_mb: int = DEFAULT_CACHE_MB, confidence: dict | None = None,
                 min_confidence: float = 0.0):
        super().__init__(generator, selection, encoder, entries, nn=generator.image_backend == "nn",
                         storage_options=storage_options, settings=settings, example_cache_mb=example_cache_mb,
                         confidence=confidence, min_confidence=min_confidence)
        self.niqe_scorer = niqe  # a NIQE scorer to use (the evaluation's cached one); None: built in setup
        from rag4dmc.actors.factory import image_generator_class

        self.RESOURCES = image_generator_class(generator).RESOURCES

    def setup(self) -> None:
        super().setup()
        self.generator = create_image_generator(self.gcfg)
        # NIQE runs where the generator does: on the GPU beside SDXL, not on the CPU while the GPU waits.
        device = str(getattr(self.generator, "device", "cpu"))
        if not wants_niqe(self.scfg):
            self.niqe = None
        else:
            self.niqe = self.niqe_scorer or NiqeScorer(self.scfg.niqe_params, device=device)

    @staticmethod
    def resources(generator: GeneratorConfig) -> Resources:
        from rag4dmc.actors.factory import image_generator_class

        return image_generator_class(generator).RESOURCES

    def complete(self, rows, work, found, cols, errors) -> None:
        examples = [found[j] for j in work]
        n = self.n_candidates(examples)
        seed = batch_seed(self.gcfg.seed, [rows["row_key"][j] for j in work])
        prompts = [rows["text"][j] for j in work]
        if self.nn:  # candidates are the neighbours: cos(E_I(c), z_hat_I) is each one's retrieval cross term
            cands = self.generator.generate_indexed(prompts, examples, n, seed)
        else:
            cands = [[(None, c) for c in cand] for cand in self.generator.generate(prompts, examples, n, seed)]
        for j, ex, cand in zip(work, examples, cands):
            if not cand:
                errors[j] = f"{self.generator.name} produced no image"
                continue
            pictures = [c for _, c in cand]
            niqe = self.niqe(pictures) if self.niqe is not None else None
            if self.nn:
                picked = [ex[i] for i, _ in cand]
                scores = select_image(np.array([e.cross for e in picked], np.float32), niqe, self.scfg,
                                      fused=np.array([e.score for e in picked], np.float32))
                cols["candidate_ids"][j] = [e.id for e in picked]
            else:
                scores = select_image(candidate_cosines(self.encoder.encode_images(pictures), rows["pseudo"][j]),
                                      niqe, self.scfg)
            best = int(np.argmax(scores))
            cols["image"][j] = encode_image(pictures[best], self.gcfg.image_format)
            cols["generator"][j] = self.generator.name
            cols["candidate_scores"][j] = [float(s) for s in scores]
            cols["chosen"][j] = best
