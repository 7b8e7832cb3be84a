"""A Llama-family decoder (Llama 2/3, Mistral, Qwen2, Phi-3, SmolLM) over a flattened, paged batch.
Families whose steps do more (Qwen3, Gemma 2/3, partial rotary) run the FamilyModel subclass
(family_model.py), which LlamaModel(...) builds for them, so this forward stays Llama's alone.

Projections are fused (q|k|v and gate|up) so each layer is a handful of large GEMMs; on CPU the
per-op overhead of eager PyTorch is what a small model's decode step is made of.

batch_invariant: every row's result is bit-identical whatever its batch mates, chunk sizes and
prefix-cache hits. Linear layers (the LM head too) run InvariantLinear, every query token runs the
decode attention kernel at its own context length, and the fused norm, RoPE and SwiGLU kernels
already compute each row alone with an arithmetic that depends only on the model's widths.

quantization="int8": the layers' linears and the LM head hold per-channel int8 weights (Int8Linear). A
tied LM head gets its own int8 copy (the embedding lookup keeps the full-precision table): the head is
a fifth of a small model's weights, and decode streams all of them every token. The int8 kernel sums
each output in one fixed order whatever the rows, so it also serves the batch-invariant mode.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from sutra.model.arch import ModelArch
from sutra.model.attention import AttentionMetadata, paged_attention, per_token_metadata
from sutra.model.cpu_kernels import cpu_kernels, int8_kernels
from sutra.model.hf_dir import expected_shapes, layer_shapes
from sutra.model.int8_linear import Int8Linear, int8_weight_bytes
from sutra.model.linear import SMALL_BATCH_MAX_BYTES, InvariantLinear, Linear
from sutra.model.ops import select_ops
from sutra.model.rope import RotaryEmbedding

# The fused projections of a layer: each runtime weight is its Hugging Face parts stacked by rows, in
# this order (a stored checkpoint holds them so, see sutra/model/store/layout.py).
FUSED_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
_LAYER_PREFIX = "model.layers."
_NORMS = ("input_layernorm", "post_attention_layernorm", "q_norm", "k_norm", "attn_out_norm", "mlp_out_norm")


class LlamaLayer:
    def __init__(
        self,
        weights: dict[str, torch.Tensor],
        small_batch: bool,
        invariant: bool,
        quantization: str | None = None,
    ) -> None:
        self.input_norm = weights["input_layernorm"]
        self.post_norm = weights["post_attention_layernorm"]  # the MLP input's norm
        # Other families' extras (None in Llama): per-head q/k norms, and the norms of the attention
        # and MLP outputs (Gemma's post_attention_layernorm and post_feedforward_layernorm).
        self.q_norm = weights.get("q_norm")
        self.k_norm = weights.get("k_norm")
        self.attn_out_norm = weights.get("attn_out_norm")
        self.mlp_out_norm = weights.get("mlp_out_norm")
        if quantization == "int8":
            self.qkv = Int8Linear(weights["qkv"], weights.get("qkv_bias"))
            self.o = Int8Linear(weights["o"])
            self.gate_up = Int8Linear(weights["gate_up"])
            self.down = Int8Linear(weights["down"])
            return
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

    def __new__(cls, arch: ModelArch, *args: Any, **kwargs: Any) -> LlamaModel:
        # Every model is built as LlamaModel(...); one whose layers do more than Llama's becomes a
        # FamilyModel here, so Llama's own steps carry no check for other families' features.
        if cls is LlamaModel and not arch.is_plain_llama():
            from sutra.model.family_model import FamilyModel

            cls = FamilyModel
        return super().__new__(cls)

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
        check_quantization(quantization, batch_invariant, device)
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
        self.quantization = quantization
        self.scale = (arch.query_pre_attn_scalar or arch.head_dim) ** -0.5
        # The invariant mode keeps one packed copy per weight and never runs the small-batch kernel.
        small_batch = (
            not batch_invariant
            and quantization is None
            and weight_bytes(arch, dtype) <= SMALL_BATCH_MAX_BYTES
        )
        # Each layer is built as soon as its weights are in. A stored checkpoint hands its tensors
        # over in layer order as its reading threads finish them, so building a layer (repacking its
        # weights, where the backend does) overlaps reading the next ones.
        layer_names = [_layer_weight_names(arch, i) for i in range(arch.num_layers)]
        layers: list[LlamaLayer | None] = [None] * arch.num_layers
        w: dict[str, torch.Tensor] = {}
        for name, tensor in weights.items():
            w[name] = tensor.to(device=device, dtype=dtype)
            i = _layer_of(name)
            if i is not None and i < len(layers) and layers[i] is None and layer_names[i] <= w.keys():
                layers[i] = self._fuse_layer(w, i, small_batch)
        self.embed = w["model.embed_tokens.weight"]
        lm_head = self.embed if arch.tie_word_embeddings else w["lm_head.weight"]
        if quantization == "int8":
            self.lm_head: Linear | InvariantLinear | Int8Linear = Int8Linear(lm_head)
        elif batch_invariant:
            self.lm_head = InvariantLinear(lm_head)
        else:
            self.lm_head = Linear(lm_head, small_batch=small_batch)
        self.norm = self._norm_weight(w["model.norm.weight"])
        self.layers = [
            layer if layer is not None else self._fuse_layer(w, i, small_batch)
            for i, layer in enumerate(layers)
        ]
        self.ops = select_ops(device)  # the fused C++ kernels whenever batch_invariant
        self.rope = RotaryEmbedding(
            arch.rotary_dim, max_positions, arch.rope_theta, arch.rope_scaling, dtype, device
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
        quantization: str | None = None,
    ) -> LlamaModel:
        """Random weights of the right shapes, for speed benchmarks of large models."""
        gen = torch.Generator(device=device).manual_seed(seed)
        weights = random_weights(arch, gen, dtype, device)
        return cls(arch, weights, dtype, device, max_positions, batch_invariant, quantization)

    def _fuse_layer(self, w: dict[str, torch.Tensor], i: int, small_batch: bool) -> LlamaLayer:
        p = f"{_LAYER_PREFIX}{i}."
        qkv, gate_up = FUSED_PROJECTIONS["self_attn.qkv_proj"], FUSED_PROJECTIONS["mlp.gate_up_proj"]
        fused = {
            "input_layernorm": w.pop(p + "input_layernorm.weight"),
            "post_attention_layernorm": w.pop(p + "post_attention_layernorm.weight"),
            "qkv": cat_rows([w.pop(p + f"{n}.weight") for n in qkv]),
            "o": w.pop(p + "self_attn.o_proj.weight"),
            "gate_up": cat_rows([w.pop(p + f"{n}.weight") for n in gate_up]),
            "down": w.pop(p + "mlp.down_proj.weight"),
        }
        if p + "self_attn.q_proj.bias" in w:
            fused["qkv_bias"] = cat_rows([w.pop(p + f"{n}.bias") for n in qkv])
        if self.arch.qk_norm:
            fused["q_norm"] = w.pop(p + "self_attn.q_norm.weight")
            fused["k_norm"] = w.pop(p + "self_attn.k_norm.weight")
        if self.arch.sandwich_norms:
            # Gemma's post_attention_layernorm normalizes the attention output; its MLP input norm is
            # pre_feedforward_layernorm, which takes the place of Llama's post_attention_layernorm.
            fused["attn_out_norm"] = fused["post_attention_layernorm"]
            fused["post_attention_layernorm"] = w.pop(p + "pre_feedforward_layernorm.weight")
            fused["mlp_out_norm"] = w.pop(p + "post_feedforward_layernorm.weight")
        for name in _NORMS:
            if name in fused:
                fused[name] = self._norm_weight(fused[name])
        return LlamaLayer(fused, small_batch, self.batch_invariant, self.quantization)

    def _norm_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight RMSNorm multiplies by: Gemma stores it less one (its norm scales by 1 + weight)."""
        offset = self.arch.norm_weight_offset
        return weight if not offset else (weight.float() + offset).to(weight.dtype)

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


def cat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat(parts), or a view when the parts already lie back to back in one buffer, as a stored
    checkpoint's fused projections do: the same values without copying the weights at load."""
    first = parts[0]
    rest = tuple(first.shape[1:])
    end = first.data_ptr()
    for part in parts:
        if (
            part.data_ptr() != end
            or not part.is_contiguous()
            or part.dtype != first.dtype
            or part.device != first.device
            or tuple(part.shape[1:]) != rest
            or part.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
        ):
            return torch.cat(parts)
        end += part.numel() * part.element_size()
    shape = (sum(part.shape[0] for part in parts), *rest)
    stride = tuple(math.prod(shape[d + 1 :]) for d in range(len(shape)))
    return first.as_strided(shape, stride, first.storage_offset())


def _layer_of(name: str) -> int | None:
    """The layer index in a "model.layers.{i}." weight name, else None."""
    if not name.startswith(_LAYER_PREFIX):
        return None
    index = name[len(_LAYER_PREFIX) :].split(".", 1)[0]
    return int(index) if index.isdigit() else None


def _layer_weight_names(arch: ModelArch, i: int) -> set[str]:
    return set(layer_shapes(arch, i))


QUANTIZATIONS = (None, "int8")


def check_quantization(quantization: str | None, batch_invariant: bool, device: torch.device) -> None:
    """Raise ValueError for a quantization the engine does not have, or cannot combine."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be None or 'int8', got {quantization!r}")
    if quantization == "int8" and batch_invariant and (device.type != "cpu" or int8_kernels() is None):
        raise ValueError(
            "batch_invariant with quantization='int8' needs Sutra's int8 C++ kernel on a CPU device (its "
            "torch fallback sums in a batch-dependent order); this engine's device is "
            f"{device.type}" + ("" if device.type != "cpu" else " and the kernel did not build (see the log)")
        )


def weight_bytes(arch: ModelArch, dtype: torch.dtype, quantization: str | None = None) -> int:
    """The bytes of the model's weights (a tied LM head counted once in dtype). With int8, the
    projections and the LM head are int8 plus per-channel fp32 scales; the embedding, norms and biases
    stay in dtype, and a tied head adds its int8 copy."""
    shapes = expected_shapes(arch)
    total = sum(math.prod(shape) for shape in shapes.values()) * dtype.itemsize
    if quantization != "int8":
        return total
    for name, shape in shapes.items():
        if name.endswith("_proj.weight") or name == "lm_head.weight":
            total += int8_weight_bytes(*shape) - math.prod(shape) * dtype.itemsize
    if arch.tie_word_embeddings:
        total += int8_weight_bytes(arch.vocab_size, arch.hidden_size)
    return total


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

    def ones(n: int) -> torch.Tensor:  # unit norms, stored as the family stores them
        return torch.full((n,), 1.0 - arch.norm_weight_offset, dtype=dtype, device=device)

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
        if arch.qk_norm:
            w[p + "self_attn.q_norm.weight"] = ones(hd)
            w[p + "self_attn.k_norm.weight"] = ones(hd)
        if arch.sandwich_norms:
            w[p + "pre_feedforward_layernorm.weight"] = ones(h)
            w[p + "post_feedforward_layernorm.weight"] = ones(h)
        if arch.attention_bias:
            for n, size in (
                ("q", arch.num_heads * hd),
                ("k", arch.num_kv_heads * hd),
                ("v", arch.num_kv_heads * hd),
            ):
                w[p + f"self_attn.{n}_proj.bias"] = rand(size)
    return w
