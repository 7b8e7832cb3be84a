"""Named model shapes for `random:<preset>`: real architectures' dimensions with randomly initialised weights."""

from __future__ import annotations

import copy
from typing import Any

from sutra.errors import ModelLoadError
from sutra.model.arch import FULL, SLIDING, ModelArch

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _gemma(name: str, *, version: int, num_layers: int, pattern: int, **shape: Any) -> ModelArch:
    """A Gemma 2 (soft-capped) or Gemma 3 (q/k norms, local RoPE base) shape; every pattern-th layer
    attends in full, the others to the sliding window."""
    extra: dict[str, Any] = (
        {"attn_logit_softcap": 50.0, "final_logit_softcap": 30.0}
        if version == 2
        else {"qk_norm": True, "rope_local_theta": 10000.0}
    )
    return ModelArch(
        num_layers=num_layers,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        sandwich_norms=True,
        norm_weight_offset=1.0,
        hidden_act="gelu_tanh",
        embed_scale=shape["hidden_size"] ** 0.5,
        layer_types=[SLIDING if (i + 1) % pattern else FULL for i in range(num_layers)],
        name=name,
        **shape,
        **extra,
    )


PRESETS: dict[str, ModelArch] = {
    "llama-3-8b": ModelArch(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=dict(_LLAMA3_ROPE),
        tie_word_embeddings=False,
        max_position_embeddings=8192,
        name="llama-3-8b",
    ),
    "llama-3.2-1b": ModelArch(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "factor": 32.0},
        tie_word_embeddings=True,
        max_position_embeddings=131072,
        name="llama-3.2-1b",
    ),
    "llama-3.2-3b": ModelArch(
        vocab_size=128256,
        hidden_size=3072,
        intermediate_size=8192,
        num_layers=28,
        num_heads=24,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "factor": 32.0},
        tie_word_embeddings=True,
        max_position_embeddings=131072,
        name="llama-3.2-3b",
    ),
    "qwen2-0.5b": ModelArch(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        attention_bias=True,
        name="qwen2-0.5b",
    ),
    "qwen3-0.6b": ModelArch(
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        max_position_embeddings=40960,
        qk_norm=True,
        name="qwen3-0.6b",
    ),
    "gemma-2-2b": _gemma(
        "gemma-2-2b",
        version=2,
        num_layers=26,
        pattern=2,
        vocab_size=256000,
        hidden_size=2304,
        intermediate_size=9216,
        num_heads=8,
        num_kv_heads=4,
        head_dim=256,
        rope_theta=10000.0,
        max_position_embeddings=8192,
        query_pre_attn_scalar=256.0,
        sliding_window=4096,
    ),
    "gemma-3-1b": _gemma(
        "gemma-3-1b",
        version=3,
        num_layers=26,
        pattern=6,
        vocab_size=262144,
        hidden_size=1152,
        intermediate_size=6912,
        num_heads=4,
        num_kv_heads=1,
        head_dim=256,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        query_pre_attn_scalar=256.0,
        sliding_window=512,
    ),
    "smollm2-135m": ModelArch(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        name="smollm2-135m",
    ),
    # Tiny shapes for tests; vocab matches the bundled tokenizer so every sampled id decodes.
    "tiny-llama": ModelArch(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        max_position_embeddings=2048,
        name="tiny-llama",
    ),
    "tiny-qwen2": ModelArch(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        attention_bias=True,
        name="tiny-qwen2",
    ),
    "tiny-qwen3": ModelArch(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        max_position_embeddings=2048,
        qk_norm=True,
        name="tiny-qwen3",
    ),
    "tiny-gemma2": _gemma(
        "tiny-gemma2",
        version=2,
        num_layers=4,
        pattern=2,
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        query_pre_attn_scalar=16.0,
        sliding_window=32,
    ),
    "tiny-gemma3": _gemma(
        "tiny-gemma3",
        version=3,
        num_layers=4,
        pattern=2,  # Gemma 3's pattern is 6; four layers need a shorter one to hold both kinds
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=1000000.0,
        max_position_embeddings=2048,
        query_pre_attn_scalar=16.0,
        sliding_window=32,
    ),
}


def get_preset(name: str) -> ModelArch:
    """A fresh copy of the named preset's ModelArch (callers may mutate it)."""
    if name not in PRESETS:
        raise ModelLoadError(
            f"unknown model preset {name!r}; available presets: {', '.join(sorted(PRESETS))}"
        )
    return copy.deepcopy(PRESETS[name])
