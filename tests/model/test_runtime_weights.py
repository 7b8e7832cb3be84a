"""A built model's weights given back under Hugging Face names rebuild the same model without a copy:
the same greedy tokens, the fused projections as views of the exported slices; weights that were
repacked are refused rather than given back wrong; memory is counted once per storage."""

from __future__ import annotations

import pytest
import torch

from sutra.config import CacheConfig, EngineConfig, ModelConfig
from sutra.engine.engine import LLMEngine
from sutra.model.loader import LoadedModel, preloaded
from sutra.model.runtime_weights import export_weights, storage_bytes, tensors_in, to_host
from sutra.sampling_params import SamplingParams


def _engine(model: str) -> LLMEngine:
    return LLMEngine(
        EngineConfig(ModelConfig(model=model, dtype="float32"), CacheConfig(num_blocks=32, block_size=16))
    )


def _greedy(engine: LLMEngine, prompt: list[int]) -> list[int]:
    engine.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens = out.outputs[0].token_ids
    return tokens


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])  # untied; q/k/v biases and tied
def test_exported_weights_rebuild_the_same_model_without_copying(preset: str):
    first = _engine(f"random:{preset}")
    prompt = [1, 422, 3120, 314, 5, 77, 901]
    expected = _greedy(first, prompt)
    weights = export_weights(first.runner.model)
    assert weights is not None
    model_bytes = storage_bytes(tensors_in(first.runner.model))
    assert storage_bytes(weights.values()) <= model_bytes  # views of the model's memory, no copy

    loaded = LoadedModel(first.arch, to_host(weights), first.tokenizer, f"random:{preset}")
    with preloaded(loaded):
        second = _engine("this source is never read")
    assert _greedy(second, prompt) == expected
    # Fused back into the very memory the exported slices view.
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    assert second.runner.model.layers[0].qkv.weight.data_ptr() == q.data_ptr()
    assert second.runner.model.embed.data_ptr() == weights["model.embed_tokens.weight"].data_ptr()


def test_repacked_weights_are_not_given_back():
    engine = _engine("random:tiny-llama")
    engine.runner.model.layers[1].gate_up.packed = True  # as oneDNN's bf16 layout would be
    assert export_weights(engine.runner.model) is None
    assert export_weights(object()) is None


def test_storage_bytes_counts_each_storage_once():
    base = torch.zeros(100, dtype=torch.float32)
    views = [base[:10], base[10:], base.view(10, 10)]
    assert storage_bytes(views) == 400
    assert storage_bytes([*views, torch.zeros(5, dtype=torch.float64)]) == 440
    nested = {"a": [base[:3], (base[5:],)], "b": torch.ones(2)}
    assert sorted(t.numel() for t in tensors_in(nested)) == [2, 3, 95]
