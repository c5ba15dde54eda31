#!/usr/bin/env bash
# Set up (if needed) and run the main job: quantize a real bundled model (SmolLM2-135M)
# and print accuracy, size and speed before and after, on the GPU when there is one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" examples/quantize_smollm2.py "$@"
