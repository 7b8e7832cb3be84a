"""Load a local Hugging Face model directory: config.json, *.safetensors (maybe sharded) and tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sutra.errors import ModelLoadError
from sutra.model.arch import ModelArch
from sutra.model.generation_config import generation_defaults
from sutra.model.hf_config import SUPPORTED_ARCHITECTURES, arch_from_config
from sutra.model.tokenizer import Tokenizer

# arch_from_config and SUPPORTED_ARCHITECTURES live in hf_config.py; importable from here as before.
__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "arch_from_config",
    "check_weights",
    "expected_shapes",
    "layer_shapes",
    "load_hf_dir",
    "split_fused",
]
# Checkpoints that store these projections fused (Phi-3) are split into the Llama parts at load; the
# model fuses them again, as views of the same rows.
_FUSED_IN_CHECKPOINT = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
# Buffers some checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_hf_dir(path: Path) -> tuple[ModelArch, dict[str, torch.Tensor], Tokenizer]:
    config = _read_json(path / "config.json")
    if config is None:
        raise ModelLoadError(
            f"{path} has no config.json (nor a single .gguf file); it is not a model directory"
        )
    arch = arch_from_config(config, path)
    weights = read_weights(path, arch)
    return arch, weights, read_tokenizer(path, config)


def expected_shapes(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    """Every weight a model of this arch has, under Hugging Face Llama names (and the other families'
    names for what Llama lacks: q_norm/k_norm, pre_/post_feedforward_layernorm)."""
    h = arch.hidden_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (arch.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    for i in range(arch.num_layers):
        shapes |= layer_shapes(arch, i)
    return shapes


def layer_shapes(arch: ModelArch, i: int) -> dict[str, tuple[int, ...]]:
    """The weights of layer i."""
    h, q, kv = arch.hidden_size, arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    p = f"model.layers.{i}."
    shapes: dict[str, tuple[int, ...]] = {
        p + "input_layernorm.weight": (h,),
        p + "post_attention_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (q, h),
        p + "self_attn.k_proj.weight": (kv, h),
        p + "self_attn.v_proj.weight": (kv, h),
        p + "self_attn.o_proj.weight": (h, q),
        p + "mlp.gate_proj.weight": (arch.intermediate_size, h),
        p + "mlp.up_proj.weight": (arch.intermediate_size, h),
        p + "mlp.down_proj.weight": (h, arch.intermediate_size),
    }
    if arch.attention_bias:
        shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,)}
        shapes[p + "self_attn.v_proj.bias"] = (kv,)
    if arch.qk_norm:
        shapes |= {
            p + "self_attn.q_norm.weight": (arch.head_dim,),
            p + "self_attn.k_norm.weight": (arch.head_dim,),
        }
    if arch.sandwich_norms:
        shapes |= {
            p + "pre_feedforward_layernorm.weight": (h,),
            p + "post_feedforward_layernorm.weight": (h,),
        }
    return shapes


def split_fused(weights: dict[str, torch.Tensor], arch: ModelArch) -> dict[str, torch.Tensor]:
    """Fused qkv_proj / gate_up_proj weights (Phi-3) as their Llama parts: row views, no copy."""
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    rows = {"self_attn.qkv_proj": (q, kv, kv), "mlp.gate_up_proj": (arch.intermediate_size,) * 2}
    for name in list(weights):
        for fused, parts in _FUSED_IN_CHECKPOINT.items():
            suffix = f".{fused}.weight"
            if not name.endswith(suffix):
                continue
            tensor = weights.pop(name)
            if tensor.shape[0] != sum(rows[fused]):
                raise ModelLoadError(f"{name} has {tensor.shape[0]} rows, expected {sum(rows[fused])}")
            for part, piece in zip(parts, tensor.split(rows[fused]), strict=True):
                weights[f"{name.removesuffix(suffix)}.{part}.weight"] = piece
    return weights


def check_weights(
    weights: dict[str, torch.Tensor], arch: ModelArch, source: str | Path
) -> dict[str, torch.Tensor]:
    """The weights the arch needs, checked for presence and shape; a tied lm_head copy is dropped."""
    shapes = expected_shapes(arch)
    missing = [n for n in shapes if n not in weights]
    if missing:
        raise ModelLoadError(f"{source} lacks {len(missing)} weights, e.g. {missing[:3]}")
    extra = [
        n for n in weights if n not in shapes and n != "lm_head.weight" and not n.endswith(_IGNORED_SUFFIXES)
    ]
    if extra:
        raise ModelLoadError(f"{source} has weights this architecture does not use, e.g. {extra[:3]}")
    for name, shape in shapes.items():
        if tuple(weights[name].shape) != shape:
            raise ModelLoadError(f"{source}: {name} has shape {tuple(weights[name].shape)}, expected {shape}")
    return {name: weights[name] for name in shapes}


def read_weights(path: Path, arch: ModelArch) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = _read_json(path / "model.safetensors.index.json")
    if index is not None:
        files = sorted(set(index["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"{path} has no *.safetensors weights (PyTorch .bin checkpoints are not supported)"
        )
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        if not (path / name).is_file():
            raise ModelLoadError(f"{path}: the shard {name} named in model.safetensors.index.json is missing")
        weights.update(load_file(str(path / name)))
    return check_weights(split_fused(weights, arch), arch, path)


def read_tokenizer(path: Path, config: dict[str, Any]) -> Tokenizer:
    from transformers import AutoTokenizer

    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"could not load the tokenizer in {path}: {e}") from e
    generation = _read_json(path / "generation_config.json") or {}
    extra = _as_list(generation.get("eos_token_id")) + _as_list(config.get("eos_token_id"))
    tokenizer = Tokenizer.from_transformers(hf_tokenizer, extra)
    tokenizer.generation_defaults = generation_defaults(generation)
    return tokenizer


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e


def _as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]
