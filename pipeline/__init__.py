"""Driver-side job: configuration, data I/O, knowledge base, retrieval, evaluation, CLI."""

from rag4dmc.pipeline import blas

blas.name_cpu()  # before any module here imports FAISS, whose bundled OpenBLAS reads it once, on load
