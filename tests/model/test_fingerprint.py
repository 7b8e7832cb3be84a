"""The model fingerprint that roots prefix-cache keys: the same in every process for the same
weights, whatever path they came from, and different for different weights."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from sutra.config import ModelConfig
from sutra.model.fingerprint import model_fingerprint
from sutra.model.loader import load_model

_FINGERPRINT_IN_A_CHILD = """
import sys
from sutra.config import ModelConfig
from sutra.model.fingerprint import model_fingerprint
from sutra.model.loader import load_model
m = load_model(ModelConfig(model=sys.argv[1]))
print(model_fingerprint(m.arch, m.weights, m.source))
"""


def _fingerprint(model: str) -> str:
    loaded = load_model(ModelConfig(model=model))
    return model_fingerprint(loaded.arch, loaded.weights, loaded.source)


def test_same_weights_same_fingerprint_in_another_process_and_path(tiny_llama_hf_dir: Path, tmp_path: Path):
    here = _fingerprint(str(tiny_llama_hf_dir))
    copy = shutil.copytree(tiny_llama_hf_dir, tmp_path / "elsewhere")
    child = subprocess.run(
        [sys.executable, "-c", _FINGERPRINT_IN_A_CHILD, str(copy)], capture_output=True, text=True, check=True
    )
    assert child.stdout.strip().splitlines()[-1] == here


def test_different_weights_differ(tiny_llama_hf_dir: Path, tiny_qwen2_hf_dir: Path):
    loaded = load_model(ModelConfig(model=str(tiny_llama_hf_dir)))
    base = model_fingerprint(loaded.arch, loaded.weights, loaded.source)
    assert base != _fingerprint(str(tiny_qwen2_hf_dir))
    # One changed value at the end of one tensor (a fine-tune's last row) is enough.
    name = sorted(loaded.weights)[-1]
    loaded.weights[name] = loaded.weights[name].clone()
    loaded.weights[name].view(-1)[-1] += 1.0
    assert model_fingerprint(loaded.arch, loaded.weights, loaded.source) != base
