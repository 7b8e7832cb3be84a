"""RoPE frequencies against transformers' own implementation (plain and Llama-3 scaled)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from sutra.model.rope import RotaryEmbedding, apply_rotary, inverse_frequencies

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _hf_inv_freq(rope_parameters: dict) -> torch.Tensor:
    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters=rope_parameters)
    rope_type = rope_parameters.get("rope_type", "default")
    if rope_type == "default":
        theta = rope_parameters["rope_theta"]
        return 1.0 / (theta ** (torch.arange(0, 128, 2, dtype=torch.int64).float() / 128))
    inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config)
    return inv_freq


def test_plain_frequencies_match_transformers():
    ours = inverse_frequencies(128, 500000.0, None)
    torch.testing.assert_close(ours, _hf_inv_freq({"rope_type": "default", "rope_theta": 500000.0}))


def test_llama3_scaling_matches_transformers():
    ours = inverse_frequencies(128, 500000.0, LLAMA3)
    theirs = _hf_inv_freq({**LLAMA3, "rope_theta": 500000.0})
    torch.testing.assert_close(ours, theirs)
    assert not torch.allclose(ours, inverse_frequencies(128, 500000.0, None))


def test_rotation_preserves_norm_and_is_relative():
    rope = RotaryEmbedding(64, 128, 10000.0, None, torch.float32, torch.device("cpu"))
    q, k = torch.randn(1, 2, 64), torch.randn(1, 2, 64)

    def rotated(x: torch.Tensor, pos: int) -> torch.Tensor:
        cos, sin = rope.lookup(torch.tensor([pos]))
        return apply_rotary(x, cos, sin)

    torch.testing.assert_close(rotated(q, 17).norm(), q.norm())
    # The score depends only on the distance between positions.
    s1 = (rotated(q, 10) * rotated(k, 3)).sum()
    s2 = (rotated(q, 50) * rotated(k, 43)).sum()
    torch.testing.assert_close(s1, s2, rtol=1e-4, atol=1e-4)
