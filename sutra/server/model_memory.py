"""How much memory a served model holds: its weights plus its KV cache.

Before a model is first loaded its footprint is estimated from its architecture (the weights' shapes
in the runtime dtype, and the KV cache the engine options size); once loaded, it is measured from the
engine's own tensors, each storage counted once (so it includes what the backend adds, such as the
small-batch kernel's second copy of the weights, and what views share is not counted twice).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from sutra.config import EngineConfig
from sutra.engine.engine import LLMEngine
from sutra.engine.runner import resolve_device, resolve_dtype
from sutra.model.arch import ModelArch
from sutra.model.hf_dir import expected_shapes
from sutra.model.runtime_weights import storage_bytes, tensors_in

GB = 2**30  # as --kv-cache-memory-gb counts


@dataclass(frozen=True)
class Footprint:
    weight_bytes: int
    kv_bytes: int

    @property
    def total(self) -> int:
        return self.weight_bytes + self.kv_bytes

    def describe(self) -> str:
        return (
            f"{self.total / GB:.2f} GB (weights {self.weight_bytes / GB:.2f} GB + KV cache "
            f"{self.kv_bytes / GB:.2f} GB)"
        )


def estimate_footprint(config: EngineConfig, arch: ModelArch) -> Footprint:
    """The footprint an engine with this config would have, from the shapes alone."""
    dtype = resolve_dtype(config.model.dtype, resolve_device(config.model.device))
    weights = sum(math.prod(shape) for shape in expected_shapes(arch).values()) * dtype.itemsize
    # As LLMEngine sizes its pool (ModelRunner.bytes_per_block).
    per_block = 2 * arch.num_layers * config.cache.block_size * arch.num_kv_heads * arch.head_dim
    per_block *= dtype.itemsize
    blocks = config.cache.num_blocks or max(1, int(config.cache.kv_cache_memory_gb * 2**30) // per_block)
    return Footprint(weights, blocks * per_block)


def measure_footprint(engine: LLMEngine, also_kept: Iterable[torch.Tensor] = ()) -> Footprint:
    """What a built engine holds: its model's tensors (plus tensors kept beside it for the host cache
    that the model does not share) and its KV cache."""
    kv = storage_bytes(t for pair in engine.runner.kv_caches for t in pair)
    weights = storage_bytes([*tensors_in(engine.runner.model), *also_kept])
    return Footprint(weights, kv)
