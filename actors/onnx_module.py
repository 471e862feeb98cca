"""A frozen torch module run by ONNX Runtime on CPU: exported once per machine, cached on disk, one session per actor.

On CPU, torch eager runs the lite image tower (EfficientNet-Lite0: depthwise convolutions) at about 29
images/s on one thread of a Zen 4 core; ONNX Runtime runs the same exported graph about 2.4x faster with the
same float32 outputs (``bench/actors_encoders.py``, docs/benchmarks.md). The export (``torch.export`` to ONNX,
about 10 s) is keyed by the module's weights and the library versions, so each machine pays it once and every
later actor loads the cached graph in a fraction of a second.

A graph keyed by its weight *files* (:meth:`OnnxModule.cached`) is found without building the module: an actor
whose graphs are cached never imports torch (about 2 s of CPU, and as much again for the model's own library).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rag4dmc.actors.weights import WEIGHTS_CACHE

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ONNX_CACHE = WEIGHTS_CACHE / "onnx"  # exported graphs, named by :func:`file_key`
ONNX_OPSET = 18
EXPORT_LIBRARIES = ("torch", "onnxscript", "onnxruntime")  # their versions are part of every key
DIGEST_CHUNK_BYTES = 8 * 2**20


def _library_versions() -> list[str]:
    return [version(p) for p in EXPORT_LIBRARIES]  # package metadata: nothing is imported


def file_key(files: Sequence[str | Path], spec: str) -> str:
    """A digest of weight files (by content), of ``spec`` (what is built from them, and its inputs) and of the
    exporter's and runtime's versions: the key of a graph that can be found before any module is built."""
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            while chunk := f.read(DIGEST_CHUNK_BYTES):
                digest.update(chunk)
    digest.update(repr((spec, _library_versions(), ONNX_OPSET)).encode())
    return digest.hexdigest()[:20]


def export_onnx(module: torch.nn.Module, examples: torch.Tensor | tuple, path: Path,
                input_names: Sequence[str] = ("x",), dynamic: Sequence[dict] | None = None) -> None:
    """``module`` as an ONNX graph, written atomically to ``path``. ``dynamic``: per input, its dynamic dimensions
    ({axis: name}); by default the first (batch) dimension of each input."""
    import torch

    examples = examples if isinstance(examples, tuple) else (examples,)
    dims: dict[str, torch.export.Dim] = {}
    shapes = tuple({axis: dims.setdefault(name, torch.export.Dim(name)) for axis, name in d.items()}
                   for d in (dynamic or [{0: "batch"}] * len(examples)))
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        program = torch.onnx.export(module.eval(), examples, dynamo=True, dynamic_shapes=shapes,
                                    input_names=list(input_names), output_names=["y"], opset_version=ONNX_OPSET)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=path.parent, suffix=".partial")
    os.close(fd)
    try:
        program.save(partial)
        os.replace(partial, path)  # atomic: an actor exporting at the same time writes the same graph
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)


def default_threads() -> int:
    """The CPUs a session computes on: ``OMP_NUM_THREADS`` (Ray sets it to the CPUs an actor was given), else
    every CPU this process may run on."""
    with contextlib.suppress(ValueError):
        threads = int(os.environ.get("OMP_NUM_THREADS", ""))
        if threads > 0:
            return threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class OnnxModule:
    """An exported graph's forward on numpy arrays through ONNX Runtime on ``threads`` CPU threads (default:
    :func:`default_threads`). Made by :meth:`cached`, which exports the graph when this machine has none."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        self.path = path
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or default_threads()
        opts.inter_op_num_threads = 1
        # Idle threads sleep instead of spinning: actors share cores with Ray's reads and other pools.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    @classmethod
    def cached(cls, files: Sequence[str | Path], spec: str,
               build: Callable[[], tuple[torch.nn.Module, tuple, Sequence[str], Sequence[dict]]],
               threads: int | None = None, cache_dir: str | Path | None = None) -> OnnxModule:
        """The graph of the module ``build`` returns (with its example inputs, their names and dynamic axes), keyed
        by the weight ``files`` and ``spec``: built and exported only when this machine has no graph for that key."""
        path = Path(cache_dir or ONNX_CACHE) / f"{file_key(files, spec)}.onnx"
        if not path.is_file():
            module, examples, names, dynamic = build()
            log.info("exporting %s to ONNX (once per machine): %s", type(module).__name__, path)
            export_onnx(module, examples, path, names, dynamic)
        return cls(path, threads)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.inputs[0]: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The first output for named inputs (given in the graph's own dtypes)."""
        return self.session.run(None, {name: np.ascontiguousarray(feeds[name]) for name in self.inputs})[0]
