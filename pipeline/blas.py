"""Name the CPU to OpenBLAS before FAISS loads its own copy, so that FAISS's matrix products use this CPU's kernels.

faiss-cpu's wheels bundle OpenBLAS 0.3.15 (2021). That version does not recognise newer x86 server CPUs (Sapphire
Rapids and later Xeons, the usual hosts of GPU nodes) and falls back to its Prescott kernels: SSE3, no AVX. Every
exact search, k-means step and IVF training in FAISS then multiplies matrices several times slower than the CPU
can (measured in ``bench/blas.py``). OpenBLAS reads ``OPENBLAS_CORETYPE`` once, when the library loads, so this
module sets it, from the CPU's own feature flags, on import of the ``pipeline`` package: before any module of ours
imports FAISS. A value the user set is left alone.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Iterable, MutableMapping

log = logging.getLogger(__name__)

ENV = "OPENBLAS_CORETYPE"
# OpenBLAS's kernel families for x86-64, newest first, with the CPU flags (as /proc/cpuinfo names them) each needs.
CORES = (
    ("SkylakeX", frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "fma", "avx2"})),
    ("Haswell", frozenset({"avx2", "fma"})),
)
FALLBACK_CORES = frozenset({"Prescott", "Core2", "Penryn", "Dunnington", "Nehalem", "Atom"})  # OpenBLAS names, no AVX


def coretype(flags: Iterable[str], machine: str) -> str | None:
    """The newest OpenBLAS x86-64 kernel family whose instructions the CPU has, or None (not x86-64, or no AVX2)."""
    if machine.lower() not in ("x86_64", "amd64"):
        return None
    have = set(flags)
    return next((name for name, needs in CORES if needs <= have), None)


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The feature flags of the first CPU in ``cpuinfo`` (Linux); empty where there is no such file."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def name_cpu(environ: MutableMapping[str, str] = os.environ, flags: Iterable[str] | None = None,
             machine: str | None = None) -> str | None:
    """Set ``OPENBLAS_CORETYPE`` in ``environ`` from the CPU's flags unless it is set; return the value in force."""
    if environ.get(ENV):
        return environ[ENV]
    core = coretype(cpu_flags() if flags is None else flags, platform.machine() if machine is None else machine)
    if core is not None:
        environ[ENV] = core
    return core


def openblas_cores(info: list[dict] | None = None) -> list[dict]:
    """The OpenBLAS libraries loaded in this process, with their version and the kernel family each one chose.

    ``info`` is threadpoolctl's description of the loaded libraries, where the caller already has it."""
    if info is None:
        from threadpoolctl import threadpool_info

        info = threadpool_info()
    return [{"filepath": i["filepath"], "version": i.get("version"), "architecture": i.get("architecture")}
            for i in info if i.get("internal_api") == "openblas"]


def warn_if_generic(info: list[dict] | None = None) -> list[dict]:
    """Log a warning for each loaded OpenBLAS running kernels without AVX, saying what to set; return those."""
    generic = [lib for lib in openblas_cores(info) if lib["architecture"] in FALLBACK_CORES]
    for lib in generic:
        log.warning("OpenBLAS %s (%s) runs its generic %s kernels on this CPU, several times slower than it can: "
                    "set %s (e.g. SkylakeX or Haswell) before Python starts, or import rag4dmc.pipeline before faiss",
                    lib["version"], lib["filepath"], lib["architecture"], ENV)
    return generic
