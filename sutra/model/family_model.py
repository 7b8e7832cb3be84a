"""The decoder families whose steps do more than Llama's: Qwen3, Gemma 2, Gemma 3, partial rotary (Phi).

Their weights are fused and loaded as LlamaModel's; what differs is the step, each difference switched on
by a ModelArch field:
- qk_norm (Qwen3, Gemma 3): a per-head RMSNorm of q and k before RoPE;
- sandwich_norms (Gemma): the attention and MLP outputs are normalized before they join the residual;
- hidden_act "gelu_tanh" (Gemma): GeGLU instead of SwiGLU;
- embed_scale (Gemma): embeddings times sqrt(hidden_size), in the model's dtype as transformers does;
- sliding layers and attention soft-capping (Gemma 2/3): those layers attend in torch
  (window_attention.py), the others on the C++ kernels where they are built;
- rope_local_theta (Gemma 3): sliding layers rotate with their own base;
- partial rotary (Phi): RoPE on the first rotary_dim dims of each head, in torch;
- final_logit_softcap (Gemma 2): cap * tanh(logits / cap).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from sutra.model.arch import ModelArch
from sutra.model.attention import AttentionMetadata, paged_attention, per_token_metadata, write_kv
from sutra.model.llama import LlamaLayer, LlamaModel
from sutra.model.ops import Rotary
from sutra.model.rope import RotaryEmbedding, apply_rotary
from sutra.model.window_attention import window_attention


class FamilyModel(LlamaModel):
    def __init__(
        self,
        arch: ModelArch,
        weights: Mapping[str, torch.Tensor],
        dtype: torch.dtype,
        device: torch.device,
        max_positions: int,
        batch_invariant: bool = False,
        quantization: str | None = None,
    ) -> None:
        # Per layer: the sliding window (None: full attention) and whether it runs window_attention.
        self.windows = [arch.sliding_window if arch.is_sliding(i) else None for i in range(arch.num_layers)]
        self.masked = [w is not None or arch.attn_logit_softcap is not None for w in self.windows]
        if batch_invariant and any(self.masked):
            feature = "sliding-window" if any(w is not None for w in self.windows) else "soft-capped"
            raise ValueError(
                f"batch_invariant is not supported for {arch.name}: its {feature} attention runs in torch, "
                "not on the C++ kernels the mode needs"
            )
        super().__init__(arch, weights, dtype, device, max_positions, batch_invariant, quantization)
        self.partial_rotary = arch.rotary_dim != arch.head_dim
        self.embed_scale = (
            torch.tensor(arch.embed_scale).to(dtype=dtype, device=device) if arch.embed_scale != 1.0 else None
        )
        self.act_and_mul = self.ops.gelu_and_mul if arch.hidden_act == "gelu_tanh" else self.ops.silu_and_mul
        # ropes[0] is the model's RoPE; Gemma 3's sliding layers use ropes[1], with their own base.
        self.ropes = [self.rope]
        self.rope_of = [0] * arch.num_layers
        if arch.rope_local_theta is not None:
            self.ropes.append(
                RotaryEmbedding(arch.rotary_dim, max_positions, arch.rope_local_theta, None, dtype, device)
            )
            self.rope_of = [1 if arch.is_sliding(i) else 0 for i in range(arch.num_layers)]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """input_ids, positions: [T]. Returns the final hidden states [T, hidden]."""
        a = self.arch
        eps = a.rms_norm_eps
        ops = self.ops
        if self.batch_invariant:
            meta = per_token_metadata(meta)
        rotaries = [
            rope.lookup(positions) if self.partial_rotary else ops.rotary_inputs(rope, positions)
            for rope in self.ropes
        ]
        x = F.embedding(input_ids, self.embed)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        h, residual = ops.add_rms_norm(x, None, self.layers[0].input_norm, eps)
        for i, layer in enumerate(self.layers):
            k_cache, v_cache = kv_caches[i]
            qkv = layer.qkv(h)
            if layer.q_norm is not None:
                self._qk_norm(qkv, layer)
            q, k, v = self._rotate_and_cache(
                qkv, rotaries[self.rope_of[i]], k_cache, v_cache, meta.slot_mapping
            )
            if self.masked[i]:
                attn = window_attention(
                    q, k_cache, v_cache, meta, self.scale, self.windows[i], a.attn_logit_softcap
                )
            else:
                attn = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale)
            out = layer.o(attn)
            if layer.attn_out_norm is not None:
                out = ops.rms_norm(out, layer.attn_out_norm, eps)
            h, residual = ops.add_rms_norm(out, residual, layer.post_norm, eps)
            out = layer.down(self.act_and_mul(layer.gate_up(h)))
            if layer.mlp_out_norm is not None:
                out = ops.rms_norm(out, layer.mlp_out_norm, eps)
            next_norm = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.norm
            h, residual = ops.add_rms_norm(out, residual, next_norm, eps)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        cap = self.arch.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def _qk_norm(self, qkv: torch.Tensor, layer: LlamaLayer) -> None:
        """RMSNorm over each q and k head of the fused projection [T, width], in place."""
        a = self.arch
        d = a.head_dim
        for start, heads, weight in (
            (0, a.num_heads, layer.q_norm),
            (a.num_heads * d, a.num_kv_heads, layer.k_norm),
        ):
            part = qkv[:, start : start + heads * d]
            normed = self.ops.rms_norm(part.reshape(-1, d), weight, a.rms_norm_eps)
            if normed.data_ptr() != part.data_ptr():  # else a one-row reshape was a view, done in place
                part.copy_(normed.view(part.shape))

    def _rotate_and_cache(
        self,
        qkv: torch.Tensor,
        rotary: Rotary,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        a = self.arch
        if not self.partial_rotary:
            return self.ops.rotary_and_cache(qkv, rotary, k_cache, v_cache, slot_mapping, a.num_heads)
        # Partial rotary: only the first rotary_dim dims of each q and k head turn (HF Phi layout).
        heads, d, r = a.num_heads + a.num_kv_heads, a.head_dim, a.rotary_dim
        qk = qkv[:, : heads * d].view(-1, heads, d)
        qk = torch.cat((apply_rotary(qk[..., :r], *rotary), qk[..., r:]), dim=-1)
        q, k = qk[:, : a.num_heads], qk[:, a.num_heads :]
        v = qkv[:, heads * d :].view(-1, a.num_kv_heads, d)
        write_kv(k, v, k_cache, v_cache, slot_mapping)
        return q, k, v
