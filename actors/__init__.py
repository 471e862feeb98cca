"""Callable classes that Ray runs: encoders, retrievers, generators, scorers, CPU preprocessing."""

import rag4dmc.pipeline  # noqa: F401  (names the CPU to OpenBLAS before an actor imports FAISS: pipeline/blas.py)
