"""Generation and selection stages: n candidates per row, scored inside the actor, the best one kept.

Candidates never travel back to the driver: each actor generates, embeds and scores its candidates
(s_T = l1*cos + l2*BLEU, s_I = l1*cos - l2*NIQE) and emits only the chosen completion with the
candidate scores for provenance. With the nearest-neighbour generator the candidates are knowledge-base
entries, so their cosine to the pseudo-embedding is the retrieval's cross term and no encoder runs.
"""

from __future__ import annotations

import json
import logging
import time
import zlib

import numpy as np
import pyarrow as pa

from actors.generators import Example, create_image_generator, create_text_generator
from actors.images import InputError, encode_image, load_image
from actors.resources import Resources
from pipeline import kb as kbmod
from pipeline.config import EncoderConfig, GeneratorConfig, SelectionConfig
from pipeline.schema import STATUS_COMPLETED, STATUS_FAILED, TASK_FAILED, TASK_I2T, TASK_T2I, numpy_stage
from pipeline.selection import NiqeScorer, candidate_cosines, select_image, select_text, wants_niqe

log = logging.getLogger(__name__)


def batch_seed(base: int, row_keys) -> int:
    """A seed fixed by the rows in the batch, so reruns of the same batch draw the same candidates."""
    return (base + zlib.crc32("|".join(map(str, row_keys)).encode())) % 2**31


class _Complete:
    """Shared bookkeeping of the two completion stages."""

    task: str
    generated: str

    def __init__(self, generator: GeneratorConfig, selection: SelectionConfig, encoder: EncoderConfig,
                 entries: pa.Table | str, nn: bool, storage_options: dict | None = None, settings: dict | None = None):
        self.gcfg, self.scfg, self.nn = generator, selection, nn
        # The retrieval and selection settings this direction runs with, and where they came from (calibrated
        # at KB build, set by the user, or defaults): every completed row carries them as provenance.
        self.settings = json.dumps(settings, sort_keys=True) if settings else None
        self.max_pixels = encoder.max_image_pixels
        self.encoder = None
        if not nn:
            from actors.encoders import create_encoder

            self.encoder = create_encoder(encoder)
        # A KB URI (the job's actors): its entries file memory-mapped, so an actor reads only the rows its
        # queries retrieve, however large the KB. A table: entries already in this process (tests, evaluation).
        self.entries = entries if isinstance(entries, pa.Table) else kbmod.load_entries(entries, storage_options)

    def examples(self, ids: list[np.ndarray], scores: list[np.ndarray], cross: list[np.ndarray]
                 ) -> list[list[Example]]:
        """The retrieved KB entries of each row (ids < 0 are padding), gathered in one take for the batch."""
        keep = [np.asarray(r) >= 0 for r in ids]
        flat = np.concatenate([np.asarray(r, dtype=np.int64)[k] for r, k in zip(ids, keep)]) if ids else []
        rows = kbmod.take_entries(self.entries, flat)
        out, at = [], 0
        for s, c, k in zip(scores, cross, keep):
            sc, cr = np.asarray(s)[k], np.asarray(c)[k]
            out.append([Example(id=rows["id"][at + j], text=rows["text"][at + j] or "", image=rows["image"][at + j],
                                score=float(sc[j]), cross=float(cr[j])) for j in range(len(sc))])
            at += len(sc)
        return out

    @numpy_stage
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        n = len(batch["row_key"])
        task = np.array(batch["task"], dtype=object)
        error = np.array(batch["error"], dtype=object)
        rows = [i for i in range(n) if task[i] == self.task]
        # Rows of the other task pass through: keep what an earlier stage wrote for them.
        cols = {c: np.array(batch[c], dtype=object) if c in batch else np.full(n, None, object)
                for c in ("generated", "status", "generator", "retrieved_ids", "fusion_scores", "candidates",
                          "candidate_ids", "candidate_scores", "settings")}
        cols["chosen"] = np.array(batch["chosen"], dtype=np.int32) if "chosen" in batch else np.full(n, -1, np.int32)
        text = np.array(batch["text"], dtype=object)
        image = np.array(batch["image"], dtype=object)
        work = []
        found = self.examples([batch["ret_ids"][i] for i in rows], [batch["ret_fused"][i] for i in rows],
                              [batch["ret_cross"][i] for i in rows])
        for i, ex in zip(rows, found):
            cols["retrieved_ids"][i] = [e.id for e in ex]
            cols["fusion_scores"][i] = [e.score for e in ex]
            cols["settings"][i] = self.settings
            if not ex:
                task[i], error[i] = TASK_FAILED, "the knowledge base returned no neighbours for this row"
            else:
                work.append((i, ex))
        if work:
            try:
                self.complete(batch, work, cols, text, image, task, error)
            except InputError as exc:  # a whole-batch input problem: fail these rows, keep the actor
                for i, _ in work:
                    task[i], error[i] = TASK_FAILED, str(exc)
        for i in rows:
            cols["status"][i] = STATUS_FAILED if task[i] == TASK_FAILED else STATUS_COMPLETED
            cols["generated"][i] = None if task[i] == TASK_FAILED else self.generated
        spent = (time.perf_counter() - t0) / max(len(rows), 1)
        seconds = np.array(batch.get("seconds_generate", np.zeros(n)), dtype=np.float32)
        seconds[rows] += spent
        out = {k: v for k, v in batch.items() if not k.startswith(("ret_", "query", "pseudo"))}
        out.update(cols, task=task, error=error, text=text, image=image, seconds_generate=seconds)
        return out

    def n_candidates(self, work) -> int:
        """Candidates per row: a generator's n samples, or for the nearest-neighbour generator every retrieved
        example (``retrieval.n_results``, which the calibration chooses)."""
        return max(len(ex) for _, ex in work) if self.nn else self.gcfg.n_candidates

    def complete(self, batch, work, cols, text, image, task, error) -> None:
        raise NotImplementedError


class CompleteTexts(_Complete):
    """Image -> text: caption candidates (BLIP2, or the neighbours' texts), scored with cosine + BLEU."""

    task, generated = TASK_I2T, "text"

    def __init__(self, generator: GeneratorConfig, selection: SelectionConfig, encoder: EncoderConfig,
                 entries: pa.Table | str, storage_options: dict | None = None, settings: dict | None = None):
        super().__init__(generator, selection, encoder, entries, nn=generator.text_backend == "nn",
                         storage_options=storage_options, settings=settings)
        self.generator = create_text_generator(generator)

    @staticmethod
    def resources(generator: GeneratorConfig) -> Resources:
        from actors.generators import text_generator_class

        return text_generator_class(generator).RESOURCES

    def complete(self, batch, work, cols, text, image, task, error) -> None:
        n = self.n_candidates(work)
        queries, ok = [], []
        for i, ex in work:
            try:
                queries.append(None if self.nn else load_image(image[i], max_pixels=self.max_pixels))
                ok.append((i, ex))
            except InputError as exc:
                task[i], error[i] = TASK_FAILED, str(exc)
        if not ok:
            return
        seed = batch_seed(self.gcfg.seed, [batch["row_key"][i] for i, _ in ok])
        examples = [ex for _, ex in ok]
        if self.nn:  # candidates are the neighbours: cos(E_T(c), z_hat_T) is each one's retrieval cross term
            found = self.generator.generate_indexed(queries, examples, n, seed)
        else:
            found = [[(None, c) for c in cand] for cand in self.generator.generate(queries, examples, n, seed)]
        for (i, ex), cand in zip(ok, found):
            cand = [(j, c) for j, c in cand if isinstance(c, str) and c.strip()]
            if not cand:
                task[i], error[i] = TASK_FAILED, f"{self.generator.name} produced no usable caption"
                continue
            texts = [c for _, c in cand]
            if self.nn:
                picked = [ex[j] for j, _ in cand]
                scores = select_text(texts, np.array([e.cross for e in picked], np.float32), self.scfg,
                                     fused=np.array([e.score for e in picked], np.float32))
                cols["candidate_ids"][i] = [e.id for e in picked]
            else:
                cos = candidate_cosines(self.encoder.encode_texts(texts), batch["pseudo"][i])
                scores = select_text(texts, cos, self.scfg, reference=ex[0].text)
            best = int(np.argmax(scores))
            text[i] = texts[best]
            cols["generator"][i] = self.generator.name
            cols["candidates"][i] = texts
            cols["candidate_scores"][i] = [float(s) for s in scores]
            cols["chosen"][i] = best


class CompleteImages(_Complete):
    """Text -> image: image candidates (SDXL, or the neighbours' images), scored with cosine - NIQE."""

    task, generated = TASK_T2I, "image"

    def __init__(self, generator: GeneratorConfig, selection: SelectionConfig, encoder: EncoderConfig,
                 entries: pa.Table | str, storage_options: dict | None = None, settings: dict | None = None):
        super().__init__(generator, selection, encoder, entries, nn=generator.image_backend == "nn",
                         storage_options=storage_options, settings=settings)
        self.generator = create_image_generator(generator)
        # NIQE runs where the generator does: on the GPU beside SDXL, not on the CPU while the GPU waits.
        device = str(getattr(self.generator, "device", "cpu"))
        self.niqe = NiqeScorer(selection.niqe_params, device=device) if wants_niqe(selection) else None

    @staticmethod
    def resources(generator: GeneratorConfig) -> Resources:
        from actors.generators import image_generator_class

        return image_generator_class(generator).RESOURCES

    def complete(self, batch, work, cols, text, image, task, error) -> None:
        n = self.n_candidates(work)
        seed = batch_seed(self.gcfg.seed, [batch["row_key"][i] for i, _ in work])
        prompts, examples = [text[i] for i, _ in work], [ex for _, ex in work]
        if self.nn:  # candidates are the neighbours: cos(E_I(c), z_hat_I) is each one's retrieval cross term
            found = self.generator.generate_indexed(prompts, examples, n, seed)
        else:
            found = [[(None, c) for c in cand] for cand in self.generator.generate(prompts, examples, n, seed)]
        for (i, ex), cand in zip(work, found):
            if not cand:
                task[i], error[i] = TASK_FAILED, f"{self.generator.name} produced no image"
                continue
            pictures = [c for _, c in cand]
            niqe = self.niqe(pictures) if self.niqe is not None else None
            if self.nn:
                picked = [ex[j] for j, _ in cand]
                scores = select_image(np.array([e.cross for e in picked], np.float32), niqe, self.scfg,
                                      fused=np.array([e.score for e in picked], np.float32))
                cols["candidate_ids"][i] = [e.id for e in picked]
            else:
                scores = select_image(candidate_cosines(self.encoder.encode_images(pictures), batch["pseudo"][i]),
                                      niqe, self.scfg)
            best = int(np.argmax(scores))
            image[i] = encode_image(pictures[best], self.gcfg.image_format)
            cols["generator"][i] = self.generator.name
            cols["candidate_scores"][i] = [float(s) for s in scores]
            cols["chosen"][i] = best
