"""A Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM) over a flattened, paged batch.

Projections are fused (q|k|v and gate|up) so each layer is a handful of large GEMMs; on CPU the
per-op overhead of eager PyTorch is what a small model's decode step is made of.

batch_invariant: every row's result is bit-identical whatever its batch mates, chunk sizes and
prefix-cache hits. Linear layers (the LM head too) run InvariantLinear, every query token runs the
decode attention kernel at its own context length, and the fused norm, RoPE and SwiGLU kernels
already compute each row alone with an arithmetic that depends only on the model's widths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sutra.model.arch import ModelArch
from sutra.model.attention import AttentionMetadata, paged_attention, per_token_metadata
from sutra.model.cpu_kernels import cpu_kernels
from sutra.model.linear import SMALL_BATCH_MAX_BYTES, InvariantLinear, Linear
from sutra.model.ops import select_ops
from sutra.model.rope import RotaryEmbedding


class LlamaLayer:
    def __init__(self, weights: dict[str, torch.Tensor], small_batch: bool, invariant: bool) -> None:
        self.input_norm = weights["input_layernorm"]
        self.post_norm = weights["post_attention_layernorm"]
        if invariant:
            self.qkv = InvariantLinear(weights["qkv"], weights.get("qkv_bias"))
            self.o = InvariantLinear(weights["o"])
            self.gate_up = InvariantLinear(weights["gate_up"])
            self.down = InvariantLinear(weights["down"])
            return
        self.qkv = Linear(weights["qkv"], weights.get("qkv_bias"), small_batch)
        self.o = Linear(weights["o"], small_batch=small_batch)
        self.gate_up = Linear(weights["gate_up"], small_batch=small_batch)
        self.down = Linear(weights["down"], small_batch=small_batch)


class LlamaModel:
    """Plain tensors, no nn.Module: the model is only ever run forward under inference_mode."""

    def __init__(
        self,
        arch: ModelArch,
        weights: dict[str, torch.Tensor],
        dtype: torch.dtype,
        device: torch.device,
        max_positions: int,
        batch_invariant: bool = False,
    ) -> None:
        if batch_invariant and (device.type != "cpu" or cpu_kernels() is None):
            raise ValueError(
                "batch_invariant needs Sutra's C++ CPU kernels on a CPU device (a C++ compiler, and "
                f"SUTRA_DISABLE_CPU_KERNELS unset); this engine's device is {device.type}"
                + ("" if device.type != "cpu" else " and its kernels did not build (see the log)")
            )
        self.arch = arch
        self.dtype = dtype
        self.device = device
        self.batch_invariant = batch_invariant
        self.scale = arch.head_dim**-0.5
        w = {k: v.to(device=device, dtype=dtype) for k, v in weights.items()}
        # The invariant mode keeps one packed copy per weight and never runs the small-batch kernel.
        small_batch = not batch_invariant and (
            sum(t.numel() * t.element_size() for t in w.values()) <= SMALL_BATCH_MAX_BYTES
        )
        self.embed = w["model.embed_tokens.weight"]
        lm_head = self.embed if arch.tie_word_embeddings else w["lm_head.weight"]
        self.lm_head = (
            InvariantLinear(lm_head) if batch_invariant else Linear(lm_head, small_batch=small_batch)
        )
        self.norm = w["model.norm.weight"]
        self.layers = [self._fuse_layer(w, i, small_batch) for i in range(arch.num_layers)]
        self.ops = select_ops(device)  # the fused C++ kernels whenever batch_invariant
        self.rope = RotaryEmbedding(
            arch.head_dim, max_positions, arch.rope_theta, arch.rope_scaling, dtype, device
        )

    @classmethod
    def random(
        cls,
        arch: ModelArch,
        dtype: torch.dtype,
        device: torch.device,
        max_positions: int,
        seed: int = 0,
        batch_invariant: bool = False,
    ) -> LlamaModel:
        """Random weights of the right shapes, for speed benchmarks of large models."""
        gen = torch.Generator(device=device).manual_seed(seed)
        weights = random_weights(arch, gen, dtype, device)
        return cls(arch, weights, dtype, device, max_positions, batch_invariant)

    def _fuse_layer(self, w: dict[str, torch.Tensor], i: int, small_batch: bool) -> LlamaLayer:
        p = f"model.layers.{i}."
        fused = {
            "input_layernorm": w.pop(p + "input_layernorm.weight"),
            "post_attention_layernorm": w.pop(p + "post_attention_layernorm.weight"),
            "qkv": torch.cat([w.pop(p + f"self_attn.{n}_proj.weight") for n in "qkv"]),
            "o": w.pop(p + "self_attn.o_proj.weight"),
            "gate_up": torch.cat([w.pop(p + "mlp.gate_proj.weight"), w.pop(p + "mlp.up_proj.weight")]),
            "down": w.pop(p + "mlp.down_proj.weight"),
        }
        if p + "self_attn.q_proj.bias" in w:
            fused["qkv_bias"] = torch.cat([w.pop(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
        return LlamaLayer(fused, small_batch, self.batch_invariant)

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
        rotary = ops.rotary_inputs(self.rope, positions)
        h, residual = ops.add_rms_norm(
            F.embedding(input_ids, self.embed), None, self.layers[0].input_norm, eps
        )
        for i, layer in enumerate(self.layers):
            k_cache, v_cache = kv_caches[i]
            q, k, v = ops.rotary_and_cache(
                layer.qkv(h), rotary, k_cache, v_cache, meta.slot_mapping, a.num_heads
            )
            attn = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale)
            h, residual = ops.add_rms_norm(layer.o(attn), residual, layer.post_norm, eps)
            mlp = layer.down(ops.silu_and_mul(layer.gate_up(h)))
            next_norm = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.norm
            h, residual = ops.add_rms_norm(mlp, residual, next_norm, eps)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()


def random_weights(
    arch: ModelArch,
    gen: torch.Generator,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """HF-named random weights (small normal init, unit norms), made directly in dtype on device
    so an 8B-shaped model never exists in float32."""
    h, inter, hd = arch.hidden_size, arch.intermediate_size, arch.head_dim

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype, device=device).mul_(0.02)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=dtype, device=device)

    w = {"model.embed_tokens.weight": rand(arch.vocab_size, h), "model.norm.weight": ones(h)}
    if not arch.tie_word_embeddings:
        w["lm_head.weight"] = rand(arch.vocab_size, h)
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = ones(h)
        w[p + "post_attention_layernorm.weight"] = ones(h)
        w[p + "self_attn.q_proj.weight"] = rand(arch.num_heads * hd, h)
        w[p + "self_attn.k_proj.weight"] = rand(arch.num_kv_heads * hd, h)
        w[p + "self_attn.v_proj.weight"] = rand(arch.num_kv_heads * hd, h)
        w[p + "self_attn.o_proj.weight"] = rand(h, arch.num_heads * hd)
        w[p + "mlp.gate_proj.weight"] = rand(inter, h)
        w[p + "mlp.up_proj.weight"] = rand(inter, h)
        w[p + "mlp.down_proj.weight"] = rand(h, inter)
        if arch.attention_bias:
            for n, size in (
                ("q", arch.num_heads * hd),
                ("k", arch.num_kv_heads * hd),
                ("v", arch.num_kv_heads * hd),
            ):
                w[p + f"self_attn.{n}_proj.bias"] = rand(size)
    return w
