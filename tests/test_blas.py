"""FAISS's bundled OpenBLAS is told which CPU it runs on before it loads (pipeline/blas.py)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from rag4dmc.pipeline import blas

AVX512 = {"sse4_2", "avx", "avx2", "fma", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}


@pytest.mark.parametrize(
    ("flags", "machine", "core"),
    [
        (AVX512, "x86_64", "SkylakeX"),
        (AVX512 - {"avx512bw"}, "x86_64", "Haswell"),  # Knights Landing: AVX-512F without BW, not SkylakeX
        ({"sse4_2", "avx", "avx2", "fma"}, "x86_64", "Haswell"),
        ({"sse4_2", "avx", "avx2"}, "AMD64", None),  # AVX2 without FMA: no family whose instructions it all has
        ({"sse4_2", "avx"}, "x86_64", None),
        (AVX512, "aarch64", None),  # OpenBLAS's ARM detection is its own business
    ],
)
def test_the_newest_kernel_family_whose_instructions_the_cpu_has_is_named(flags, machine, core):
    assert blas.coretype(flags, machine) == core


def test_a_value_the_user_set_is_kept_and_an_unknown_cpu_is_left_unnamed():
    env = {blas.ENV: "Haswell"}
    assert blas.name_cpu(env, flags=AVX512, machine="x86_64") == "Haswell"
    assert env == {blas.ENV: "Haswell"}
    env = {}
    assert blas.name_cpu(env, flags=AVX512, machine="x86_64") == "SkylakeX"
    assert env == {blas.ENV: "SkylakeX"}
    env = {}
    assert blas.name_cpu(env, flags={"sse2"}, machine="x86_64") is None
    assert env == {}


def test_cpu_flags_are_read_from_the_first_cpu(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert blas.cpu_flags(str(info)) == {"fpu", "sse2", "avx2", "fma"}
    assert blas.cpu_flags(str(tmp_path / "missing")) == frozenset()


def _faiss_openblas(first: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != blas.ENV}
    code = (f"import {first}; import faiss; from rag4dmc.pipeline import blas; import json; "
            "print(json.dumps([c for c in blas.openblas_cores() if 'faiss' in c['filepath']]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(blas.coretype(blas.cpu_flags(), os.uname().machine) is None,
                    reason="this CPU has no AVX2 + FMA kernel family to name")
def test_faiss_loaded_after_pipeline_runs_the_kernels_of_this_cpu():
    cores = _faiss_openblas("rag4dmc.pipeline")
    assert cores, "faiss-cpu loaded no OpenBLAS of its own: this check needs the wheel's bundled library"
    expected = blas.coretype(blas.cpu_flags(), os.uname().machine)
    assert [c["architecture"] for c in cores] == [expected] * len(cores)


def test_a_generic_openblas_is_reported_with_the_setting_to_change(caplog):
    # threadpoolctl's description of the loaded libraries, as ThreadpoolController().info() gives it
    info = [{"internal_api": "openblas", "filepath": "/x/faiss_cpu.libs/libopenblas.so", "version": "0.3.15",
             "architecture": "Prescott", "num_threads": 2},
            {"internal_api": "openblas", "filepath": "/x/numpy.libs/libopenblas.so", "version": "0.3.31",
             "architecture": "SkylakeX", "num_threads": 2},
            {"internal_api": "openmp", "filepath": "/x/libgomp.so", "version": None, "num_threads": 2}]
    with caplog.at_level(logging.WARNING, logger="rag4dmc.pipeline.blas"):
        generic = blas.warn_if_generic(info)
    assert generic == [{"filepath": "/x/faiss_cpu.libs/libopenblas.so", "version": "0.3.15", "architecture": "Prescott"}]
    assert len(caplog.records) == 1 and "OPENBLAS_CORETYPE" in caplog.text and "Prescott" in caplog.text
