"""A model source's architecture without reading its weights: what a server needs to size a model
(weights and KV cache) before it loads it, and to refuse at start one that could never fit.

The sources are those of sutra/model/loader.py, told apart the same way: None (the bundled GGUF),
random:<preset>, a .gguf file, a Sutra checkpoint, a Hugging Face directory (or one holding a single
.gguf). Each answer reads only metadata: a GGUF's header, a checkpoint's index, a config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from sutra.errors import ModelLoadError
from sutra.model import gguf_reader
from sutra.model.arch import ModelArch
from sutra.model.hf_dir import arch_from_config
from sutra.model.loader import RANDOM_PREFIX, default_model_path
from sutra.model.presets import get_preset
from sutra.model.store.format import is_store, read_index


def probe_arch(model: str | None) -> ModelArch:
    """The ModelArch that loading `model` would produce (ModelLoadError as the loader would raise)."""
    if model is None:
        return _gguf_arch(Path(default_model_path()))
    if model.startswith(RANDOM_PREFIX):
        return get_preset(model[len(RANDOM_PREFIX) :])
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {model!r} does not exist")
    path = path.resolve()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"model file {path} is not a .gguf file; pass a .gguf file or a directory")
        return _gguf_arch(path)
    if is_store(path):
        return read_index(path).arch
    ggufs = sorted(path.glob("*.gguf"))
    config_path = path / "config.json"
    if not config_path.is_file() and len(ggufs) == 1:
        return _gguf_arch(ggufs[0])
    if not config_path.is_file():
        raise ModelLoadError(
            f"{path} has no config.json (nor a single .gguf file); it is not a model directory"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{config_path} is not readable JSON: {e}") from e
    return arch_from_config(config, path)


def _gguf_arch(path: Path) -> ModelArch:
    return gguf_reader.read_arch(gguf_reader.open_gguf(path), path)
