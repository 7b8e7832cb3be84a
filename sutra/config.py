"""One EngineConfig made of typed sub-configs; every component takes the sub-config it needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

SchedulingMode = Literal["sarathi", "prefill_first", "no_chunking"]


@dataclass
class ModelConfig:
    # None: the bundled SmolLM2-135M-Instruct GGUF. Else a local HF directory, a .gguf file,
    # or "random:<preset>" (e.g. "random:llama-3-8b") for random weights of a named shape.
    model: str | None = None
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_model_len: int | None = None  # None: the model's own context length
    seed: int = 0  # random-weight init
    num_threads: int | None = None  # torch intra-op threads on CPU; None: torch's default


@dataclass
class CacheConfig:
    block_size: int = 16
    num_blocks: int | None = None  # None: sized from kv_cache_memory_gb
    kv_cache_memory_gb: float = 2.0
    enable_prefix_caching: bool = True


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = 512  # the Sarathi-Serve token budget per iteration
    max_num_seqs: int = 128
    mode: SchedulingMode = "sarathi"
    policy: str = "fcfs"

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.mode not in ("sarathi", "prefill_first", "no_chunking"):
            raise ValueError(f"mode must be sarathi, prefill_first or no_chunking, got {self.mode!r}")


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
