"""Sutra: an LLM serving engine."""

from sutra.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from sutra.engine.engine import LLMEngine
from sutra.engine.llm import LLM
from sutra.errors import InvalidRequestError, ModelLoadError, SutraError
from sutra.outputs import CompletionOutput, RequestOutput
from sutra.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "CacheConfig",
    "CompletionOutput",
    "EngineConfig",
    "InvalidRequestError",
    "LLMEngine",
    "ModelConfig",
    "ModelLoadError",
    "RequestOutput",
    "SamplingParams",
    "SchedulerConfig",
    "SutraError",
]
