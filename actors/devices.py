"""Where a model runs, decided without importing torch where no GPU can be visible, and torch's inference mode
applied lazily: a module whose CPU path needs no torch imports it only where a model runs in torch.

Importing torch costs a process about 2 s of CPU; every actor a job starts would pay it just to learn that it
runs on CPU.
"""

from __future__ import annotations

import functools
import glob
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Device files present wherever torch could see a GPU: NVIDIA's, WSL's GPU bridge and ROCm's (torch.cuda runs on it)
GPU_DEVICE_FILES = ("/dev/nvidia[0-9]*", "/dev/dxg", "/dev/kfd")


def gpu_possible() -> bool:
    """False when torch can see no GPU here: ``CUDA_VISIBLE_DEVICES`` empty or -1 (as Ray sets it for a task or
    actor given no GPU), or no GPU device file. True means torch has to be asked."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return any(glob.glob(pattern) for pattern in GPU_DEVICE_FILES)


def resolve_device(device: str) -> str:
    """``cuda`` when asked for or (``auto``) when visible, else ``cpu``; torch is imported only to ask about a GPU
    that may be there."""
    if device == "auto":
        if not gpu_possible():
            return "cpu"
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(f"device={device} was asked for but no CUDA device is visible; use --device auto or cpu")
    return device


def pick_device(device: str) -> torch.device:
    """The ``torch.device`` a torch model runs on (see :func:`resolve_device`)."""
    import torch

    return torch.device(resolve_device(device))


def inference(method: Callable) -> Callable:
    """``method`` run under ``torch.inference_mode`` (torch imported on the first call, not with its module)."""

    @functools.wraps(method)
    def run(*args, **kwargs):
        import torch

        with torch.inference_mode():
            return method(*args, **kwargs)

    return run
