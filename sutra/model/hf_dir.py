"""Load a local Hugging Face model directory: config.json, *.safetensors (maybe sharded) and tokenizer files."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from sutra.errors import ModelLoadError
from sutra.model.arch import ModelArch
from sutra.model.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
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


def arch_from_config(config: dict[str, Any], path: Path) -> ModelArch:
    names = config.get("architectures") or [config.get("model_type")]
    if names[0] not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: architecture {names[0]!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if config.get("hidden_act", "silu") != "silu" or config.get("mlp_bias"):
        raise ModelLoadError(f"{path}: only SiLU MLPs without bias are supported")
    try:
        heads = config["num_attention_heads"]
        theta, scaling = _rope(config, path)
        return ModelArch(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_position_embeddings=_context_length(config, names[0], path),
            attention_bias=names[0] == "Qwen2ForCausalLM" or bool(config.get("attention_bias", False)),
            name=path.name,
        )
    except KeyError as e:
        raise ModelLoadError(f"{path}/config.json lacks {e.args[0]!r}") from e


def _rope(config: dict[str, Any], path: Path) -> tuple[float, dict[str, Any] | None]:
    # transformers 5 writes rope_parameters (theta inside); 4.x wrote rope_theta + rope_scaling.
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", config.get("rope_theta", 10000.0)))
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"{path}: rope type {kind!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
        )
    return theta, None if kind == "default" else {"rope_type": kind, **params}


def _context_length(config: dict[str, Any], architecture: str, path: Path) -> int:
    length = int(config.get("max_position_embeddings", 4096))
    window = config.get("sliding_window")
    if architecture == "Qwen2ForCausalLM" and not config.get("use_sliding_window"):
        window = None
    if window and window < length:
        # Full attention equals sliding-window attention up to the window, so cap the context there.
        logger.warning("%s uses a %d-token sliding window; capping the context length to it", path, window)
        length = int(window)
    return length


def expected_shapes(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    """Every weight a model of this arch has, under Hugging Face Llama names."""
    h, q, kv = arch.hidden_size, arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (arch.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
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
    return shapes


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
    return check_weights(weights, arch, path)


def read_tokenizer(path: Path, config: dict[str, Any]) -> Tokenizer:
    from transformers import AutoTokenizer

    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"could not load the tokenizer in {path}: {e}") from e
    generation = _read_json(path / "generation_config.json") or {}
    extra = _as_list(generation.get("eos_token_id")) + _as_list(config.get("eos_token_id"))
    return Tokenizer.from_transformers(hf_tokenizer, extra)


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
