"""EngineLoader: how the model pool builds a model's engine, and what it keeps when it evicts one.

A load reads the model's source (or takes its weights from the host cache), builds the LLMEngine and
wraps it in an AsyncEngine (started later, on the event loop); it runs in a worker thread. An eviction
stops the engine, drops its KV cache at once, and gives back the weights for the host cache: views of
the engine's own tensors where they are plain (sutra/model/runtime_weights.py), else the weights it was
loaded from, kept beside the engine since its load (and counted in its footprint).
"""

from __future__ import annotations

import asyncio
import gc
import logging
from dataclasses import dataclass

import torch

from sutra.config import EngineConfig
from sutra.engine.async_engine import AsyncEngine
from sutra.engine.engine import LLMEngine
from sutra.model.loader import LoadedModel, load_model, preloaded
from sutra.model.runtime_weights import export_weights, storage_bytes, to_host
from sutra.server.model_memory import measure_footprint
from sutra.server.served_model import Loaded, ServedModel

logger = logging.getLogger(__name__)


@dataclass
class _Kept:
    """Beside a ready engine: what its host-cache entry is made from at eviction."""

    source: str  # the LoadedModel's, for the rebuilt one
    raw: LoadedModel | None  # the loaded weights, when the engine's own cannot be given back


@dataclass
class EngineLoader:
    max_waiting_requests: int | None = None
    keep_weights: bool = True  # whether evictions go to a host cache

    def load(self, model: ServedModel, cached: LoadedModel | None) -> Loaded:
        config: EngineConfig = model.config
        loaded = cached if cached is not None else load_model(config.model)
        with preloaded(loaded):
            engine = LLMEngine(config)
        raw = None
        if self.keep_weights and export_weights(engine.runner.model) is None and loaded.weights is not None:
            raw = loaded  # e.g. oneDNN-packed weights: keep what they were packed from
        also_kept = list(raw.weights.values()) if raw is not None and raw.weights is not None else []
        footprint = measure_footprint(engine, also_kept)
        return Loaded(
            AsyncEngine(engine, max_waiting_requests=self.max_waiting_requests),
            footprint.total,
            _Kept(loaded.source, raw),
        )

    async def unload(self, model: ServedModel, keep_weights: bool) -> tuple[LoadedModel, int] | None:
        engine = model.engine
        assert isinstance(engine, AsyncEngine)
        await engine.shutdown()
        kept = model.keep if isinstance(model.keep, _Kept) else None
        return await asyncio.to_thread(_release, engine.engine, kept if keep_weights else None)


def _release(engine: LLMEngine, kept: _Kept | None) -> tuple[LoadedModel, int] | None:
    """Free the engine's memory (the KV cache at once, whoever still holds the engine) and return its
    weights for the host cache, if kept."""
    entry = None
    if kept is not None:
        weights = export_weights(engine.runner.model)
        if weights is None and kept.raw is not None and kept.raw.weights is not None:
            weights = dict(kept.raw.weights)
        if weights is not None:
            with torch.inference_mode():
                host = to_host(weights)
            entry = LoadedModel(engine.arch, host, engine.tokenizer, kept.source)
    engine.runner.kv_caches = []
    engine.runner.model = None  # the engine object lives on in reference cycles until a collection
    del engine
    gc.collect()
    if entry is None:
        return None
    return entry, storage_bytes(entry.weights.values())
