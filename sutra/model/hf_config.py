"""A Hugging Face config.json as a ModelArch: which decoder families run, and what each adds to Llama.

Reads both transformers 5's config layout (rope_parameters, layer_types) and the 4.x one (rope_theta,
rope_scaling, sliding_window_pattern) that most checkpoints on the Hub still carry.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from sutra.errors import ModelLoadError
from sutra.model.arch import FULL, SLIDING, ModelArch

logger = logging.getLogger(__name__)

LLAMA_LIKE = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Phi3ForCausalLM",
)
GEMMA = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
SUPPORTED_ARCHITECTURES = LLAMA_LIKE + GEMMA
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")
# config.json's activation names -> ModelArch.hidden_act
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


# model_type -> architecture, for a config.json without "architectures"
_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}


def arch_from_config(config: dict[str, Any], path: Path) -> ModelArch:
    names = config.get("architectures") or [
        _MODEL_TYPES.get(config.get("model_type"), config.get("model_type"))
    ]
    name = names[0]
    if name not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: architecture {name!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    gemma = name in GEMMA
    act_name = config.get("hidden_activation" if gemma else "hidden_act") or config.get("hidden_act", "silu")
    if act_name not in _ACTIVATIONS or config.get("mlp_bias"):
        raise ModelLoadError(
            f"{path}: the MLP activation {act_name!r}{' with a bias' if config.get('mlp_bias') else ''} is not "
            f"supported; supported: {', '.join(_ACTIVATIONS)} without bias"
        )
    if config.get("use_bidirectional_attention"):
        raise ModelLoadError(
            f"{path}: bidirectional attention (use_bidirectional_attention) is not supported"
        )
    if name in ("Qwen3ForCausalLM", *GEMMA) and config.get("attention_bias"):
        raise ModelLoadError(f"{path}: attention_bias (which {name} also puts on o_proj) is not supported")
    try:
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or _default_head_dim(name, config)
        theta, scaling, local_theta = _rope(config, name, path)
        arch = ModelArch(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", gemma)),
            max_position_embeddings=_context_length(config, name, path),
            attention_bias=name == "Qwen2ForCausalLM" or bool(config.get("attention_bias", False)),
            name=path.name,
            qk_norm=name in ("Qwen3ForCausalLM", "Gemma3ForCausalLM"),
            hidden_act=_ACTIVATIONS[act_name],
            partial_rotary_factor=_partial_rotary_factor(config),
        )
    except KeyError as e:
        raise ModelLoadError(f"{path}/config.json lacks {e.args[0]!r}") from e
    if arch.rotary_dim % 2 or arch.rotary_dim <= 0:
        raise ModelLoadError(f"{path}: partial_rotary_factor gives an odd rotary width {arch.rotary_dim}")
    if scaling and scaling["rope_type"] == "longrope":
        _check_longrope(scaling, arch, path)
    if gemma:
        _gemma(arch, config, name, local_theta, path)
    return arch


def _default_head_dim(name: str, config: dict[str, Any]) -> int:
    # what transformers' config classes default to when config.json leaves head_dim out
    defaults = {"Qwen3ForCausalLM": 128, "Gemma2ForCausalLM": 256, "Gemma3ForCausalLM": 256}
    return defaults.get(name) or config["hidden_size"] // config["num_attention_heads"]


def _gemma(arch: ModelArch, config: dict[str, Any], name: str, local_theta: float | None, path: Path) -> None:
    arch.sandwich_norms = True
    arch.norm_weight_offset = 1.0
    arch.embed_scale = arch.hidden_size**0.5
    arch.query_pre_attn_scalar = float(config.get("query_pre_attn_scalar", arch.head_dim))
    # transformers applies the attention soft-cap in Gemma 2 only; Gemma 3 has its field but ignores it.
    if name == "Gemma2ForCausalLM":
        arch.attn_logit_softcap = _positive_or_none(config, "attn_logit_softcapping", path)
    arch.final_logit_softcap = _positive_or_none(config, "final_logit_softcapping", path)
    window = config.get("sliding_window")
    if not window:
        return
    n = arch.num_layers
    types = config.get("layer_types")
    if types is None:  # configs written before transformers 5
        pattern = 2 if name == "Gemma2ForCausalLM" else int(config.get("sliding_window_pattern", 6))
        types = [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
    if len(types) != n or any(t not in (SLIDING, FULL) for t in types):
        raise ModelLoadError(
            f"{path}: layer_types must name {SLIDING!r} or {FULL!r} for each of the {n} layers, got {types}"
        )
    arch.sliding_window = int(window)
    arch.layer_types = list(types)
    if name == "Gemma3ForCausalLM":
        arch.rope_local_theta = local_theta if local_theta is not None else 10000.0


def _positive_or_none(config: dict[str, Any], key: str, path: Path) -> float | None:
    value = config.get(key)
    if value is None:
        return None
    if not value > 0:
        raise ModelLoadError(f"{path}: {key} must be positive or null, got {value!r}")
    return float(value)


def _partial_rotary_factor(config: dict[str, Any]) -> float:
    params = config.get("rope_parameters") or {}
    return float(params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))


def _rope(config: dict[str, Any], name: str, path: Path) -> tuple[float, dict[str, Any] | None, float | None]:
    """(theta, rope_scaling, the sliding layers' theta when it differs): Gemma 3's rope_parameters
    hold one entry per layer type."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    local_theta = None
    if FULL in params or SLIDING in params:
        local = dict(params.get(SLIDING) or {})
        if local.get("rope_type", "default") != "default":
            raise ModelLoadError(f"{path}: only plain RoPE is supported on sliding layers, got {local}")
        local_theta = float(local["rope_theta"]) if "rope_theta" in local else None
        params = dict(params.get(FULL) or {})
    elif name == "Gemma3ForCausalLM" and "rope_local_base_freq" in config:
        local_theta = float(config["rope_local_base_freq"])
    # transformers 5 writes rope_parameters (theta inside); 4.x wrote rope_theta + rope_scaling.
    theta = float(params.pop("rope_theta", config.get("rope_theta", 10000.0)))
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    params.pop("partial_rotary_factor", None)
    if kind == "su":  # LongRoPE's first name, as Phi-3's early configs spell it
        kind = "longrope"
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"{path}: rope type {kind!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
        )
    if kind == "default":
        return theta, None, local_theta
    if kind == "longrope":
        params = _longrope(params, config, path)
    return theta, {"rope_type": kind, **params}, local_theta


def _longrope(params: dict[str, Any], config: dict[str, Any], path: Path) -> dict[str, Any]:
    """The parameters rope.py needs, attention_factor worked out as transformers does."""
    original = params.get("original_max_position_embeddings") or config.get(
        "original_max_position_embeddings"
    )
    if not original or "short_factor" not in params or "long_factor" not in params:
        raise ModelLoadError(
            f"{path}: longrope needs short_factor, long_factor and original_max_position_embeddings"
        )
    factor = params.get("factor") or config.get("max_position_embeddings", original) / original
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return {
        "short_factor": [float(f) for f in params["short_factor"]],
        "long_factor": [float(f) for f in params["long_factor"]],
        "original_max_position_embeddings": int(original),
        "attention_factor": float(attention),
    }


def _check_longrope(scaling: dict[str, Any], arch: ModelArch, path: Path) -> None:
    for key in ("short_factor", "long_factor"):
        if len(scaling[key]) != arch.rotary_dim // 2:
            raise ModelLoadError(
                f"{path}: longrope {key} has {len(scaling[key])} entries, expected {arch.rotary_dim // 2}"
            )


def _context_length(config: dict[str, Any], architecture: str, path: Path) -> int:
    length = int(config.get("max_position_embeddings", 4096))
    if architecture in GEMMA:
        return length  # its sliding layers are masked to their window; the others see everything
    window = config.get("sliding_window")
    if architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and not config.get("use_sliding_window"):
        window = None
    if window and window < length:
        # Full attention equals sliding-window attention up to the window, so cap the context there.
        logger.warning("%s uses a %d-token sliding window; capping the context length to it", path, window)
        length = int(window)
    return length
