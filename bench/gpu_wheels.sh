#!/usr/bin/env bash
# The wheels megamesh needs on the GPU machine that its image lacks (issue 24 point 6).
#
# The image (jax 0.11.2 with CUDA, torch, transformers, tokenizers, optax, orbax, flax;
# Python 3.12) runs bench/gpu_train.py and the engine rows of bench/gpu_serve.py with
# nothing added (PYTHONPATH=src; tests/test_gpu_bench.py checks their workers load none
# of the packages below). `megamesh serve` (gpu_serve.py's megamesh-http row) and
# `megamesh train` (bench/host_gap.py) also need these. On this machine:
#
#   bash bench/gpu_wheels.sh            # -> .whl/ (gitignored), 25 wheels, ~15 MB
#
# then carry `.whl` and start the command on the GPU machine with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(
  # megamesh serve: the HTTP layer and the APIs
  fastapi==0.163.2 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5
  annotated-types==0.8.0 typing-inspection==0.4.5 opentelemetry-api==1.45.2
  uvicorn==0.54.0 anthropic==2.10.0 docstring-parser==0.18.0 jiter==0.19.0 sniffio==1.3.1
  httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5
  # tool use: constrained decoding and the schema check
  llguidance==1.9.1 jsonschema==4.26.0 jsonschema-specifications==2025.9.1
  referencing==0.37.0 rpds-py==2026.9.1
  # megamesh train: data and metrics
  grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 tensorboardX==2.6.5
  # --precision fp8 (bench/gpu_train.py megamesh-fp8): Qwix (flax is on the image)
  qwix==0.1.8
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_39_x86_64 --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 \
  --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  -d .whl "${WHEELS[@]}"
du -sh .whl
