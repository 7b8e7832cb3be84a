"""RoPE against transformers' own Llama rotary embedding and apply_rotary_pos_emb (plain and
Llama-3 scaled): frequencies, and the rotated queries and keys at many positions."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from sutra.model.rope import RotaryEmbedding, apply_rotary, inverse_frequencies

HEAD_DIM = 128
THETA = 500000.0
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
SCALINGS = {"plain": None, "llama3": LLAMA3}


def _hf_rotary(scaling: dict | None) -> LlamaRotaryEmbedding:
    params = {"rope_type": "default", **(scaling or {}), "rope_theta": THETA}
    config = LlamaConfig(
        hidden_size=32 * HEAD_DIM,
        num_attention_heads=32,
        max_position_embeddings=131072,
        rope_parameters=params,
    )
    return LlamaRotaryEmbedding(config)


@pytest.mark.parametrize("name", SCALINGS)
def test_frequencies_match_transformers(name: str):
    ours = inverse_frequencies(HEAD_DIM, THETA, SCALINGS[name])
    torch.testing.assert_close(ours, _hf_rotary(SCALINGS[name]).inv_freq, rtol=1e-6, atol=0)


def test_llama3_scaling_changes_the_frequencies():
    assert not torch.allclose(
        inverse_frequencies(HEAD_DIM, THETA, LLAMA3), inverse_frequencies(HEAD_DIM, THETA, None)
    )


@pytest.mark.parametrize("name", SCALINGS)
def test_rotated_queries_and_keys_match_transformers(name: str):
    scaling = SCALINGS[name]
    positions = torch.tensor([0, 1, 7, 100, 4095, 9000, 30000])
    q = torch.randn(len(positions), 4, HEAD_DIM, generator=torch.Generator().manual_seed(0))
    k = torch.randn(len(positions), 2, HEAD_DIM, generator=torch.Generator().manual_seed(1))

    ours = RotaryEmbedding(HEAD_DIM, 32768, THETA, scaling, torch.float32, torch.device("cpu"))
    cos, sin = ours.lookup(positions)
    q_ours, k_ours = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    # transformers works on [batch, heads, tokens, head_dim] with cos/sin of [batch, tokens, head_dim].
    hf_cos, hf_sin = _hf_rotary(scaling)(q, positions[None])
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], hf_cos, hf_sin)
    torch.testing.assert_close(q_ours, q_hf[0].transpose(0, 1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(k_ours, k_hf[0].transpose(0, 1), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(q_ours, q, atol=1e-2), "positions past 0 must rotate"
