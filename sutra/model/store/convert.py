"""`sutra convert`: any model the loader takes (GGUF, Hugging Face directory, random:<preset>, another
checkpoint) written as a checkpoint in the runtime dtype and layout."""

from __future__ import annotations

from pathlib import Path

import torch

from sutra.config import ModelConfig
from sutra.errors import ModelLoadError
from sutra.model.llama import random_weights
from sutra.model.loader import RANDOM_PREFIX, load_model
from sutra.model.store.format import StoreIndex
from sutra.model.store.writer import Progress, write_store

DEFAULT_SOURCE = "default"  # the bundled model, as `--model` left out


def runtime_dtype(dtype: str) -> torch.dtype:
    """What the engine on this machine runs with --dtype dtype ("auto": bf16 where the CPU has native
    bf16, or on CUDA, else fp32)."""
    from sutra.engine.runner import DTYPES, resolve_device, resolve_dtype  # the engine's own rule

    if dtype != "auto" and dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    return resolve_dtype(dtype, resolve_device("auto"))


def convert(
    source: str | None,
    out: Path,
    *,
    dtype: str = "auto",
    seed: int = 0,
    progress: Progress | None = None,
) -> StoreIndex:
    """Write source as a checkpoint at out (a new or empty folder). random:<preset> weights are those an
    engine with this seed makes on CPU in the same dtype."""
    target = runtime_dtype(dtype)
    model = None if source in (None, DEFAULT_SOURCE) else source
    loaded = load_model(ModelConfig(model=model, dtype="float32", device="cpu"))
    if loaded.weights is None:
        if model is None or not model.startswith(RANDOM_PREFIX):
            raise ModelLoadError(f"{source} has no weights to convert")
        generator = torch.Generator(device="cpu").manual_seed(seed)
        weights = random_weights(loaded.arch, generator, target, "cpu")
        label = f"{loaded.source}|seed={seed}"
    else:
        weights = dict(loaded.weights)  # the writer drops each weight once written
        label = loaded.source
    return write_store(Path(out), loaded.arch, weights, loaded.tokenizer, target, label, progress=progress)
