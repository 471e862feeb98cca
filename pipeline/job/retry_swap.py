"""The ``--retry-failed`` swap, crash-safe: recomputed rows replace their failed copies exactly once, whatever kills it.

The recomputed rows are first committed under ``OUT/_retry/data`` (staging). The swap then moves them into the
output and drops the failed copies from the old files. Several files change, and no file system or object store
changes several atomically, so the swap writes an intent record first, as an exactly-once sink's commit log does:

1. ``_retry/swap.json``: the moves (staged file -> its place in the output) and the retried row keys (one object:
   written whole or not at all);
2. each staged file moved into place;
3. each old file of those shards rewritten without the retried keys (each file in one piece);
4. staging and the record removed.

Every step is idempotent, so :func:`recover` rolls a swap with a record forward from the start (a moved file is
not moved again; a file already without the keys is left alone), and rolls one without a record back (its staging
is removed: the old files were not touched, and the failed rows are still there to retry). Every command that
writes or reads the output as a whole calls it first (``complete``, ``complete --retry-failed``); ``verify``
reports a swap left unfinished (:func:`swap_state`) without changing anything.

A testing aid marks each step: ``rag4dmc.actors.faults`` stage ``swap``, batch N = the Nth step.
"""

from __future__ import annotations

import json
import logging

import pyarrow as pa

from rag4dmc.actors import faults
from rag4dmc.pipeline.io.storage import Storage
from rag4dmc.pipeline.job.writer import file_row_keys, read_file, shard_dir, shard_files, write_file

log = logging.getLogger(__name__)

RETRY_DIR = "_retry"  # staging of a retry, under --out
SWAP_FILE = "swap.json"  # the intent record, in RETRY_DIR
STAGE = "swap"  # the fault-injection stage of the swap's steps


def staging_dir(out: str) -> str:
    return f"{out.rstrip('/')}/{RETRY_DIR}"


def _step(name: str) -> None:
    faults.inject(STAGE, [name])  # a testing aid; nothing when off


def swap_in(storage: Storage, out: str, shard_names: list[str]) -> int:
    """Move the staged rows of ``shard_names`` into ``out`` in place of their failed copies; returns how many."""
    out, staging = out.rstrip("/"), staging_dir(out)
    moves, keys = [], set()
    for name in shard_names:
        for f in shard_files(storage, staging, name):
            moves.append([f, f"{shard_dir(out, name)}/retry-{f.rsplit('/', 1)[-1]}"])
            keys.update(file_row_keys(storage, f))
    record = {"shards": shard_names, "moves": moves, "keys": sorted(keys)}
    storage.write_bytes(f"{staging}/{SWAP_FILE}", json.dumps(record).encode())
    _step("recorded")
    _roll_forward(storage, out, record)
    return len(keys)


def _roll_forward(storage: Storage, out: str, record: dict) -> None:
    moved = set()
    for src, dst in record["moves"]:
        if storage.exists(src):
            storage.move(src, dst)
            _step(f"moved {dst}")
        moved.add(storage.locate(dst)[1])  # as the file system names it (a relative --out is made absolute)
    keys = set(record["keys"])
    for name in record["shards"]:
        for f in shard_files(storage, out, name):
            if storage.locate(f)[1] in moved:
                continue
            old = read_file(storage, f)
            mask = pa.array([k not in keys for k in old.column("row_key").to_pylist()])
            if not all(mask.to_pylist()):
                write_file(storage, old.filter(mask), f)
                _step(f"rewrote {f}")
    storage.remove(staging_dir(out))  # the record last: the swap is done
    _step("done")


def swap_state(storage: Storage, out: str) -> str | None:
    """What an unfinished retry left in ``out`` (None: nothing): a swap to roll forward, or staging to drop."""
    staging = staging_dir(out)
    if storage.exists(f"{staging}/{SWAP_FILE}"):
        return f"{staging}/{SWAP_FILE} records a swap not finished"
    if storage.exists(staging):
        return f"{staging} holds the rows of a retry that never reached its swap"
    return None


def recover(storage: Storage, out: str) -> str | None:
    """Finish or undo what a killed ``--retry-failed`` left in ``out``; returns what was done (None: nothing)."""
    staging = staging_dir(out)
    record_path = f"{staging}/{SWAP_FILE}"
    if storage.exists(record_path):
        record = json.loads(storage.read_bytes(record_path))
        log.warning("a --retry-failed swap in %s was interrupted: finishing it (%d rows, %d files)", out,
                    len(record["keys"]), len(record["moves"]))
        _roll_forward(storage, out.rstrip("/"), record)
        return "rolled forward"
    if storage.exists(staging):
        log.warning("a --retry-failed in %s stopped before its swap: removing its staged rows (the failed rows "
                    "are still in the output, to retry)", out)
        storage.remove(staging)
        return "rolled back"
    return None
