#!/usr/bin/env bash
# Sets up .venv and starts Sutra's OpenAI-compatible server on the default model
# (SmolLM2-135M-Instruct) at http://127.0.0.1:8000/v1. Extra arguments go to `sutra serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec ./.venv/bin/sutra serve "$@"
