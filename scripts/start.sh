#!/usr/bin/env bash
# Sets up .venv and starts Sutra on the default model (SmolLM2-135M-Instruct): an interactive chat.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec ./.venv/bin/sutra chat "$@"
