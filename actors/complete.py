"""Generation and selection stages: n candidates per row, scored inside the actor, the best one kept.

Candidates never travel back to the driver: each actor generates, embeds and scores its candidates
(s_T = l1*cos + l2*BLEU, s_I = l1*cos - l2*NIQE) and emits only the chosen completion with the
candidate scores for provenance. With the nearest-neighbour generator the candidates are knowledge-base
entries, so their cosine to the pseudo-embedding is the retrieval's cross term and no encoder runs.
"""

from __future__ import annotations

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
from pipeline.selection import (
    NiqeScorer,
    candidate_cosines,
    consensus_bleu,
    image_score,
    text_score,
    text_scores,
)

log = logging.getLogger(__name__)


def batch_seed(base: int, row_keys) -> int:
    """A seed fixed by the rows in the batch, so reruns of the same batch draw the same candidates."""
    return (base + zlib.crc32("|".join(map(str, row_keys)).encode())) % 2**31


class _Complete:
    """Shared bookkeeping of the two completion stages."""

    task: str
    generated: str

    def __init__(self, generator: GeneratorConfig, selection: SelectionConfig, encoder: EncoderConfig,
                 entries: pa.Table | str, nn: bool, storage_options: dict | None = None):
        self.gcfg, self.scfg, self.nn = generator, selection, nn
        self.max_pixels = encoder.max_image_pixels
        self.encoder = None
        if not nn:
            from actors.encoders import create_encoder

            self.encoder = create_encoder(encoder)
        # A KB URI (the job's actors): its entries file memory-mapped, so an actor reads only the rows its
        # queries retrieve, however large the KB. A table: entries already in this process (tests, evaluation).
        self.entries = entries if isinstance(entries, pa.Table) else kbmod.load_entries(entries, storage_options)

    def examples(self, ids: list[np.ndarray], scores: list[np.ndarray]) -> list[list[Example]]:
        """The retrieved KB entries of each row (ids < 0 are padding), gathered in one take for the batch."""
        keep = [np.asarray(r) >= 0 for r in ids]
        flat = np.concatenate([np.asarray(r, dtype=np.int64)[k] for r, k in zip(ids, keep)]) if ids else []
        rows = kbmod.take_entries(self.entries, flat)
        out, at = [], 0
        for s, k in zip(scores, keep):
            sc = np.asarray(s)[k]
            out.append([Example(id=rows["id"][at + j], text=rows["text"][at + j] or "", image=rows["image"][at + j],
                                score=float(sc[j])) for j in range(len(sc))])
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
                          "candidate_scores")}
        cols["chosen"] = np.array(batch["chosen"], dtype=np.int32) if "chosen" in batch else np.full(n, -1, np.int32)
        text = np.array(batch["text"], dtype=object)
        image = np.array(batch["image"], dtype=object)
        work = []
        found = self.examples([batch["ret_ids"][i] for i in rows], [batch["ret_fused"][i] for i in rows])
        for i, ex in zip(rows, found):
            cols["retrieved_ids"][i] = [e.id for e in ex]
            cols["fusion_scores"][i] = [e.score for e in ex]
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

    def complete(self, batch, work, cols, text, image, task, error) -> None:
        raise NotImplementedError


class CompleteTexts(_Complete):
    """Image -> text: caption candidates (BLIP2, or the neighbours' texts), scored with cosine + BLEU."""

    task, generated = TASK_I2T, "text"

    def __init__(self, generator: GeneratorConfig, selection: SelectionConfig, encoder: EncoderConfig,
                 entries: pa.Table | str, storage_options: dict | None = None):
        super().__init__(generator, selection, encoder, entries, nn=generator.text_backend == "nn",
                         storage_options=storage_options)
        self.generator = create_text_generator(generator)

    @staticmethod
    def resources(generator: GeneratorConfig) -> Resources:
        from actors.generators import text_generator_class

        return text_generator_class(generator).RESOURCES

    def complete(self, batch, work, cols, text, image, task, error) -> None:
        n = self.gcfg.n_candidates
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
        cands = self.generator.generate(queries, [ex for _, ex in ok], n, seed)
        for (i, ex), cand in zip(ok, cands):
            cand = [c for c in cand if isinstance(c, str) and c.strip()]
            if not cand:
                task[i], error[i] = TASK_FAILED, f"{self.generator.name} produced no usable caption"
                continue
            if self.nn:  # candidates are the neighbours: cos(E_T(c), z_hat_T) is the retrieval's cross term
                cos = np.asarray(batch["ret_cross"][i][: len(cand)], np.float32)
                scores = text_score(cos, consensus_bleu(cand), self.scfg.lambda_cos, self.scfg.lambda_quality)
            else:
                emb = self.encoder.encode_texts(cand)
                scores = text_scores(emb, batch["pseudo"][i], cand, ex[0].text,
                                     self.scfg.lambda_cos, self.scfg.lambda_quality)
            best = int(np.argmax(scores))
            text[i] = cand[best]
            cols["generator"][i] = self.generator.name
            cols["candidates"][i] = list(cand)
            cols["candidate_scores"][i] = [float(s) for s in scores]
            cols["chosen"][i] = best


class CompleteImages(_Complete):
    """Text -> image: image candidates (SDXL, or the neighbours' images), scored with cosine - NIQE."""

    task, generated = TASK_T2I, "image"

    def __init__(self, generator: GeneratorConfig, selection: SelectionConfig, encoder: EncoderConfig,
                 entries: pa.Table | str, storage_options: dict | None = None):
        super().__init__(generator, selection, encoder, entries, nn=generator.image_backend == "nn",
                         storage_options=storage_options)
        self.generator = create_image_generator(generator)
        wants_niqe = selection.image_quality == "niqe" and selection.lambda_quality > 0
        # NIQE runs where the generator does: on the GPU beside SDXL, not on the CPU while the GPU waits.
        device = str(getattr(self.generator, "device", "cpu"))
        self.niqe = NiqeScorer(selection.niqe_params, device=device) if wants_niqe else None

    @staticmethod
    def resources(generator: GeneratorConfig) -> Resources:
        from actors.generators import image_generator_class

        return image_generator_class(generator).RESOURCES

    def complete(self, batch, work, cols, text, image, task, error) -> None:
        n = self.gcfg.n_candidates
        seed = batch_seed(self.gcfg.seed, [batch["row_key"][i] for i, _ in work])
        cands = self.generator.generate([text[i] for i, _ in work], [ex for _, ex in work], n, seed)
        for (i, _ex), cand in zip(work, cands):
            if not cand:
                task[i], error[i] = TASK_FAILED, f"{self.generator.name} produced no image"
                continue
            if self.nn:  # candidates are the neighbours: cos(E_I(c), z_hat_I) is the retrieval's cross term
                cos = np.asarray(batch["ret_cross"][i][: len(cand)], np.float32)
            else:
                cos = candidate_cosines(self.encoder.encode_images(cand), batch["pseudo"][i])
            niqe = self.niqe(cand) if self.niqe is not None else np.zeros(len(cand), np.float32)
            scores = image_score(cos, niqe, self.scfg.lambda_cos, self.scfg.lambda_quality, self.scfg.niqe_scale)
            best = int(np.argmax(scores))
            image[i] = encode_image(cand[best], self.gcfg.image_format)
            cols["generator"][i] = self.generator.name
            cols["candidate_scores"][i] = [float(s) for s in scores]
            cols["chosen"][i] = best
