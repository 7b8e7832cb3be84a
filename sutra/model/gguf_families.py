"""The GGUF architectures beyond Llama's shape: gemma2, gemma3 and phi3, as llama.cpp's converter
(convert_hf_to_gguf.py) writes them and llama.cpp reads them.

Each maps onto the ModelArch the Hugging Face loader builds from the same model's config.json, and its
tensors onto the same Hugging Face names and values:
- Gemma: the converter stores each RMSNorm weight plus one (llama.cpp's norm multiplies by the weight as
  it is); the model adds norm_weight_offset itself, so the one is taken off again here.
- Gemma: query_pre_attn_scalar, the sliding/full layer pattern and Gemma 3's local RoPE base are not in
  the file; llama.cpp derives them (the scalar from the layer count, which marks the 27B models), and so
  does this, reading the newer sliding_window_pattern / rope.freq_base_swa keys where a file has them.
- Phi-3: attn_qkv holds q, k and v; ffn_up holds gate and up (gate first); LongRoPE's factors are the
  rope_factors_long/short tensors, its attention factor and original length are metadata; partial rotary
  is rope.dimension_count.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sutra.errors import ModelLoadError
from sutra.model.arch import FULL, SLIDING, ModelArch
from sutra.model.hf_dir import split_fused

logger = logging.getLogger(__name__)

GEMMA = ("gemma2", "gemma3")
ARCHITECTURES = (*GEMMA, "phi3")
PARTIAL_ROTARY = ("phi3",)  # the architectures whose rope.dimension_count may be less than head_dim
ROPE_FACTORS = ("rope_factors_long.weight", "rope_factors_short.weight")

# An architecture key's value (e.g. "attention.sliding_window", without the "<arch>." prefix), else default.
Meta = Callable[[str, Any], Any]

# GGUF layer tensor -> Hugging Face module, where these families differ from Llama's table.
_GEMMA_LAYER_NAMES = {
    "post_attention_norm": "post_attention_layernorm",  # Gemma's attention output norm
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_PHI3_FUSED_NAMES = {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
# llama.cpp's defaults when a Gemma 2 file leaves the soft-caps out (the released models' values).
_GEMMA2_SOFTCAPS = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
# llama.cpp's fixed layer patterns (every n-th layer full) and the layer counts of the 27B models, which
# scale attention by hidden_size / num_heads rather than head_dim (their query_pre_attn_scalar).
_PATTERN = {"gemma2": 2, "gemma3": 6}
_LAYERS_OF_27B = {"gemma2": 46, "gemma3": 62}


def layer_names(a: str, llama_names: dict[str, str], tensor_names: Collection[str]) -> dict[str, str]:
    """The GGUF layer tensor -> Hugging Face module table of architecture `a`."""
    if a in GEMMA:
        return {**llama_names, **_GEMMA_LAYER_NAMES}
    if a == "phi3":
        names = {**llama_names, "attn_qkv": _PHI3_FUSED_NAMES["attn_qkv"]}
        if "blk.0.ffn_gate.weight" not in tensor_names:  # else gate and up are stored apart, as Llama's
            names["ffn_up"] = _PHI3_FUSED_NAMES["ffn_up"]
        return names
    return llama_names


def adapt_arch(arch: ModelArch, a: str, meta: Meta, rotary_dim: int, path: str | Path) -> None:
    """What architecture `a` adds to the Llama-shaped `arch` read from the common keys, in place."""
    if a in GEMMA:
        _gemma(arch, a, meta, path)
    elif a == "phi3":
        _phi3(arch, meta, rotary_dim, path)


def _gemma(arch: ModelArch, a: str, meta: Meta, path: str | Path) -> None:
    arch.qk_norm = a == "gemma3"
    arch.sandwich_norms = True
    arch.norm_weight_offset = 1.0
    arch.hidden_act = "gelu_tanh"
    arch.embed_scale = arch.hidden_size**0.5
    big = arch.num_layers == _LAYERS_OF_27B[a]
    arch.query_pre_attn_scalar = float(arch.hidden_size // arch.num_heads if big else arch.head_dim)
    if a == "gemma2":  # transformers applies the attention soft-cap in Gemma 2 only
        arch.attn_logit_softcap = _softcap(meta, "attn_logit_softcapping", _GEMMA2_SOFTCAPS, path)
    defaults = _GEMMA2_SOFTCAPS if a == "gemma2" else {}
    arch.final_logit_softcap = _softcap(meta, "final_logit_softcapping", defaults, path)
    window = meta("attention.sliding_window", 0)
    if not window:  # no sliding layers (Gemma 3 files may say so by leaving the window out)
        return
    arch.sliding_window = int(window)
    arch.layer_types = _layer_types(meta("attention.sliding_window_pattern", _PATTERN[a]), arch, path)
    if a == "gemma3":
        arch.rope_local_theta = float(meta("rope.freq_base_swa", 10000.0))


def _softcap(meta: Meta, key: str, defaults: dict[str, float], path: str | Path) -> float | None:
    value = meta(key, defaults.get(key))
    if value is None or value == 0:  # 0: no cap
        return None
    if not value > 0:
        raise ModelLoadError(f"{path}: {key} must be positive, got {value!r}")
    return float(value)


def _layer_types(pattern: int | list[bool], arch: ModelArch, path: str | Path) -> list[str]:
    """An int n: every n-th layer full, the others sliding (0: all sliding), as llama.cpp's
    set_swa_pattern; a list: per layer, whether it slides."""
    n = arch.num_layers
    if isinstance(pattern, list):
        if len(pattern) != n:
            raise ModelLoadError(f"{path}: sliding_window_pattern has {len(pattern)} entries for {n} layers")
        return [SLIDING if s else FULL for s in pattern]
    if pattern < 0:
        raise ModelLoadError(f"{path}: sliding_window_pattern must not be negative, got {pattern}")
    return [SLIDING if pattern == 0 or (i + 1) % pattern else FULL for i in range(n)]


def _phi3(arch: ModelArch, meta: Meta, rotary_dim: int, path: str | Path) -> None:
    if rotary_dim != arch.head_dim:
        arch.partial_rotary_factor = rotary_dim / arch.head_dim
        if rotary_dim <= 0 or rotary_dim % 2 or arch.rotary_dim != rotary_dim:
            raise ModelLoadError(f"{path}: rope.dimension_count {rotary_dim} is not a usable rotary width")
    scaling = arch.rope_scaling
    if scaling and scaling["rope_type"] == "longrope":
        for key in ("short_factor", "long_factor"):
            if len(scaling[key]) != rotary_dim // 2:
                raise ModelLoadError(
                    f"{path}: longrope {key} has {len(scaling[key])} entries, expected {rotary_dim // 2}"
                )
    window = meta("attention.sliding_window", 0)  # the converter writes 0 for none
    if window and window < arch.max_position_embeddings:
        # As for a Hugging Face directory: full attention equals sliding-window attention up to the window.
        logger.warning("%s uses a %d-token sliding window; capping the context length to it", path, window)
        arch.max_position_embeddings = int(window)


def longrope_scaling(factors: dict[str, np.ndarray], meta: Meta, path: str | Path) -> dict[str, Any]:
    """Phi-3's LongRoPE from its rope_factors_long/short tensors, as the HF loader's rope_scaling."""
    if set(factors) != set(ROPE_FACTORS):
        raise ModelLoadError(f"{path} has {', '.join(factors)} but needs both of {', '.join(ROPE_FACTORS)}")
    original = meta("rope.scaling.original_context_length", None)
    if not original:
        raise ModelLoadError(f"{path} has LongRoPE factors but no rope.scaling.original_context_length")
    attention = meta("rope.scaling.attn_factor", None)
    if attention is None:  # what transformers (and the converter) work out from the two lengths
        factor = meta("context_length", original) / original
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return {
        "rope_type": "longrope",
        "short_factor": [float32_value(f) for f in factors["rope_factors_short.weight"].reshape(-1)],
        "long_factor": [float32_value(f) for f in factors["rope_factors_long.weight"].reshape(-1)],
        "original_max_position_embeddings": int(original),
        "attention_factor": float(attention),
    }


def float32_value(value: Any) -> float:
    """A float32 as the decimal it was most likely written from: the shortest that rounds to it (1e-06,
    not 9.99999997e-07), so metadata reads as the config.json values it came from."""
    return float(str(np.float32(value)))


def finish_weights(weights: dict[str, torch.Tensor], arch: ModelArch, a: str) -> dict[str, torch.Tensor]:
    """Weights under Hugging Face names with the converter's changes undone: Phi-3's fused projections
    split, Gemma's norm weights less the one the converter added. In place; returned for chaining."""
    if a in GEMMA:
        for name, w in weights.items():
            if name.endswith("norm.weight"):
                weights[name] = w - arch.norm_weight_offset
    before = set(weights)
    split_fused(weights, arch)
    for name in set(weights) - before:
        # row views of one fused tensor; the conversion cache's safetensors file wants each its own storage
        weights[name] = weights[name].clone()
    return weights
