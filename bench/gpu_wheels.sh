#!/usr/bin/env bash
# Wheels that bench/gpu.py needs and the device machine lacks (it has torch, transformers, accelerate, timm,
# pyarrow, scipy, opencv, sacrebleu, fsspec, threadpoolctl; docs: /work/.library/device/KINDS.md), for its
# Python 3.12, into .whl/ (git ignores it). The versions are this project's venv's. About 45 MB in all: within the
# 64 MiB a device call carries. faiss-gpu has no wheel under that limit, so faiss travels as faiss-cpu (pipeline
# imports it) and faiss on the GPU is not measured.
#
#   bash bench/gpu_wheels.sh
#   then, on the device (run tool, carry [".whl"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && RAG4DMC_NIQE_PARAMS=.whl/niqe_pris_params.npz PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 timeout 480 python3 bench/gpu.py --out $OUT/gpu.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$HOME/.cache/rag4dmc/venv/bin/python}
WHEELS=(diffusers==0.42.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 pyiqa==0.1.16 pydantic==2.14.4
        pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 faiss-cpu==1.15.1)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
mkdir -p .whl
PIP_CONFIG_FILE=/dev/null "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLATFORMS[@]}" -d .whl "${WHEELS[@]}"
# NIQE's parameters (installed by `rag4dmc setup`), read there through $RAG4DMC_NIQE_PARAMS
cp "$(dirname "$PY")/../share/rag4dmc/niqe_pris_params.npz" .whl/
du -sh .whl
