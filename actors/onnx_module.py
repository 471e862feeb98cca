"""A frozen torch module run by ONNX Runtime on CPU: exported once per machine, cached on disk, one session per actor.

On CPU, torch eager runs the lite image tower (EfficientNet-Lite0: depthwise convolutions) at about 29
images/s on one thread of a Zen 4 core; ONNX Runtime runs the same exported graph about 2.4x faster with the
same float32 outputs (``bench/actors_encoders.py``, docs/benchmarks.md). The export (``torch.export`` to ONNX,
about 10 s) is keyed by the module's weights and the library versions, so each machine pays it once and every
later actor loads the cached graph in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import tempfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from rag4dmc.actors.weights import WEIGHTS_CACHE

log = logging.getLogger(__name__)

ONNX_CACHE = WEIGHTS_CACHE / "onnx"  # exported graphs, named by :func:`cache_key`
ONNX_OPSET = 18


def cache_key(module: torch.nn.Module, input_shape: tuple[int, ...]) -> str:
    """A digest of the module's weights (by content), its input shape and the exporter's and runtime's versions."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    versions = [version(p) for p in ("torch", "onnxscript", "onnxruntime")]
    digest.update(repr((type(module).__name__, tuple(input_shape[1:]), versions, ONNX_OPSET)).encode())
    return digest.hexdigest()[:20]


def export_onnx(module: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """``module`` as an ONNX graph whose first (batch) dimension is dynamic, written atomically to ``path``."""
    batch = torch.export.Dim("batch")
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        program = torch.onnx.export(module.eval(), (example,), dynamo=True, dynamic_shapes=({0: batch},),
                                    input_names=["x"], output_names=["y"], opset_version=ONNX_OPSET)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=path.parent, suffix=".partial")
    os.close(fd)
    try:
        program.save(partial)
        os.replace(partial, path)  # atomic: an actor exporting at the same time writes the same graph
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)


class OnnxModule:
    """``module``'s forward on float32 numpy arrays through ONNX Runtime on ``threads`` CPU threads (default:
    torch's count, which Ray sets to the CPUs an actor was given)."""

    def __init__(self, module: torch.nn.Module, example: torch.Tensor, threads: int | None = None,
                 cache_dir: str | Path | None = None):
        import onnxruntime as ort

        self.path = Path(cache_dir or ONNX_CACHE) / f"{cache_key(module, tuple(example.shape))}.onnx"
        if not self.path.is_file():
            log.info("exporting %s to ONNX (once per machine): %s", type(module).__name__, self.path)
            export_onnx(module, example, self.path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        # Idle threads sleep instead of spinning: actors share cores with Ray's reads and other pools.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: np.ascontiguousarray(x, dtype=np.float32)})[0]
