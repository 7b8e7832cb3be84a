"""The shape of a decoder: what every loader produces and the model is built from.

Llama's shape is the base; the other families (Qwen2/3, Mistral, Phi-3, Gemma 2/3) are Llama plus the
fields below it, each with a default that leaves a Llama model as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"
ACTIVATIONS = ("silu", "gelu_tanh")  # the gate's activation: SwiGLU, or GeGLU (tanh approximation)


@dataclass
class ModelArch:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # HF-style rope_scaling dict, e.g. {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
    # "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}; None for plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    attention_bias: bool = False  # Qwen2 has q/k/v biases
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    name: str = "llama"
    # ---- beyond Llama -------------------------------------------------------------------------
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3, Gemma 3)
    # Gemma 2/3: norms of the attention and MLP outputs as well. post_attention_layernorm is then the
    # attention output's norm and pre_feedforward_layernorm the MLP input's.
    sandwich_norms: bool = False
    norm_weight_offset: float = 0.0  # Gemma's RMSNorm scales by (1 + weight)
    hidden_act: str = "silu"  # one of ACTIVATIONS
    embed_scale: float = 1.0  # Gemma multiplies the embeddings by sqrt(hidden_size)
    query_pre_attn_scalar: float | None = None  # attention scale: its -1/2 power (else head_dim's)
    attn_logit_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcap: float | None = None  # the same on the logits (Gemma 2)
    sliding_window: int | None = None  # keys within this many positions, on the layers marked SLIDING
    layer_types: list[str] | None = None  # per layer SLIDING or FULL; None: every layer FULL
    rope_local_theta: float | None = None  # Gemma 3: sliding layers' RoPE base (plain RoPE)
    partial_rotary_factor: float = 1.0  # the fraction of head_dim that RoPE rotates (Phi)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_sliding(self, layer: int) -> bool:
        return (
            self.sliding_window is not None
            and self.layer_types is not None
            and self.layer_types[layer] == SLIDING
        )

    def is_plain_llama(self) -> bool:
        """Whether the Llama forward computes this model as it is (Llama, Mistral, Qwen2, Phi-3 with full
        rotary): then nothing of the other families runs in its steps."""
        return (
            not self.qk_norm
            and not self.sandwich_norms
            and self.hidden_act == "silu"
            and self.embed_scale == 1.0
            and self.attn_logit_softcap is None
            and self.final_logit_softcap is None
            and not any(self.is_sliding(i) for i in range(self.num_layers))
            and self.rotary_dim == self.head_dim
        )
