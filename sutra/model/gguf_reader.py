"""Read a llama.cpp GGUF file into a ModelArch and dequantized fp32 weights under Hugging Face Llama names.

Architectures: llama, qwen2 (q/k/v biases), qwen3 (per-head q/k norms), and gemma2, gemma3 and phi3,
whose additions live in gguf_families.py. llama.cpp permutes Llama's q/k rows for its interleaved RoPE and
writes the others as they are (NeoX RoPE), so only Llama's are undone.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sutra.errors import ModelLoadError
from sutra.model import gguf_families
from sutra.model.arch import ModelArch
from sutra.model.gguf_families import float32_value
from sutra.model.progress_log import ProgressLog

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", *gguf_families.ARCHITECTURES)
_PERMUTED_ROPE = ("llama",)  # the architectures whose q/k rows llama.cpp's converter permutes

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Tensors that hold rope scaling, read into the ModelArch rather than the weights.
_ROPE_TENSORS = ("rope_freqs.weight", *gguf_families.ROPE_FACTORS)


def open_gguf(path: str | Path) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises bare ValueError/struct errors on a malformed file
        raise ModelLoadError(f"{path} is not a readable GGUF file: {e}") from e


def field(reader: Any, key: str, default: Any = None) -> Any:
    """A metadata value as a Python scalar, str or list; `default` when absent."""
    f = reader.fields.get(key)
    if f is None:
        return default
    from gguf import GGUFValueType

    kind = f.types[-1]  # types = [element type] or [ARRAY, element type]
    if kind == GGUFValueType.STRING:
        values = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
    elif kind == GGUFValueType.FLOAT32:
        values = [float32_value(f.parts[i].item()) for i in f.data]
    else:
        values = [f.parts[i].item() for i in f.data]
    return values if f.types[0] == GGUFValueType.ARRAY else values[0]


def architecture(reader: Any, path: str | Path) -> str:
    arch = field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"GGUF architecture {arch!r} of {path} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def read_arch(reader: Any, path: str | Path) -> ModelArch:
    a = architecture(reader, path)
    if field(reader, f"{a}.expert_count", 0):
        raise ModelLoadError(f"{path} is a mixture-of-experts model, which is not supported")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ModelLoadError(f"{path} has no token_embd.weight tensor")

    def meta(key: str, default: Any = None) -> Any:
        return field(reader, f"{a}.{key}", default)

    num_heads = field(reader, f"{a}.attention.head_count")
    hidden = field(reader, f"{a}.embedding_length")
    head_dim = field(reader, f"{a}.attention.key_length", hidden // num_heads)
    rotary_dim = meta("rope.dimension_count", head_dim)
    if rotary_dim != head_dim and a not in gguf_families.PARTIAL_ROTARY:
        raise ModelLoadError(f"{path} uses partial rotary embeddings, which {a} models do not")
    theta = float(field(reader, f"{a}.rope.freq_base", 10000.0))
    arch = ModelArch(
        vocab_size=int(tensors["token_embd.weight"].shape[-1]),  # ggml lists dims innermost first
        hidden_size=hidden,
        intermediate_size=field(reader, f"{a}.feed_forward_length"),
        num_layers=field(reader, f"{a}.block_count"),
        num_heads=num_heads,
        num_kv_heads=field(reader, f"{a}.attention.head_count_kv", num_heads),
        head_dim=head_dim,
        rms_norm_eps=float(field(reader, f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=theta,
        rope_scaling=_rope_scaling(reader, a, path, tensors, meta, theta, head_dim),
        tie_word_embeddings="output.weight" not in tensors,
        max_position_embeddings=field(reader, f"{a}.context_length", 4096),
        attention_bias="blk.0.attn_q.bias" in tensors,
        name=Path(path).stem,
        qk_norm=a == "qwen3",
    )
    gguf_families.adapt_arch(arch, a, meta, rotary_dim, path)
    return arch


def _rope_scaling(
    reader: Any,
    a: str,
    path: str | Path,
    tensors: dict[str, Any],
    meta: gguf_families.Meta,
    theta: float,
    head_dim: int,
) -> dict[str, Any] | None:
    if "rope_freqs.weight" in tensors:
        # llama.cpp stores Llama 3.x rope scaling as precomputed per-frequency factors, not parameters.
        return infer_llama3_scaling(_dequantize(tensors["rope_freqs.weight"]), theta, head_dim, path)
    factors = {n: _dequantize(tensors[n]) for n in gguf_families.ROPE_FACTORS if n in tensors}
    if factors:  # Phi-3's LongRoPE
        return gguf_families.longrope_scaling(factors, meta, path)
    kind = field(reader, f"{a}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(field(reader, f"{a}.rope.scaling.factor"))}
    raise ModelLoadError(f"{path} uses rope scaling {kind!r}; supported: linear, llama3, longrope")


def llama3_freq_factors(
    factor: float, low: float, high: float, orig: int, theta: float, head_dim: int
) -> np.ndarray:
    """The per-frequency divisors llama3 rope scaling applies (what llama.cpp writes as rope_freqs)."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / freqs
    smooth = np.clip((orig / wavelen - low) / (high - low), 0.0, 1.0)
    return 1.0 / ((1 - smooth) / factor + smooth)


def infer_llama3_scaling(
    rope_freqs: np.ndarray, theta: float, head_dim: int, path: str | Path
) -> dict[str, Any]:
    factor = float(rope_freqs.max())
    # Every released Llama 3.x model uses these; the factor varies (8 for 3.1, 32 for 3.2).
    low, high, orig = 1.0, 4.0, 8192
    expected = llama3_freq_factors(factor, low, high, orig, theta, head_dim)
    if expected.shape != rope_freqs.shape or not np.allclose(expected, rope_freqs, rtol=1e-3):
        raise ModelLoadError(f"{path} has rope_freqs factors that match no supported rope scaling")
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": orig,
    }


def read_weights(reader: Any, arch: ModelArch, path: str | Path) -> dict[str, torch.Tensor]:
    """All weights, dequantized to fp32, with what llama.cpp's converter changed undone: the rope row
    permutation of Llama's q/k, and the families' changes (gguf_families.finish_weights)."""
    a = architecture(reader, path)
    permuted = a in _PERMUTED_ROPE
    names = gguf_families.layer_names(a, _LAYER_NAMES, [t.name for t in reader.tensors])
    weights: dict[str, torch.Tensor] = {}
    progress = ProgressLog(f"dequantizing {Path(path).name}", len(reader.tensors), "tensors")
    for i, tensor in enumerate(reader.tensors):
        progress.update(i)
        if tensor.name in _ROPE_TENSORS:
            continue
        name = hf_name(tensor.name, path, names, a)
        w = _dequantize(tensor)
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute_rope_rows(w, arch.num_heads)
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute_rope_rows(w, arch.num_kv_heads)
        w = np.ascontiguousarray(w, dtype=np.float32)
        weights[name] = torch.from_numpy(
            w if w.flags.writeable else w.copy()
        )  # unquantized data view the mmap
    return gguf_families.finish_weights(weights, arch, a)


def hf_name(
    gguf_name: str, path: str | Path, layer_names: dict[str, str] = _LAYER_NAMES, a: str = "llama"
) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_TENSOR.fullmatch(gguf_name)
    if m is None or m.group(2) not in layer_names:
        raise ModelLoadError(f"{path} has a tensor {gguf_name!r} that a {a} model does not have")
    return f"model.layers.{m.group(1)}.{layer_names[m.group(2)]}.{m.group(3)}"


def _dequantize(tensor: Any) -> np.ndarray:
    from gguf.quants import dequantize

    try:
        w = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise ModelLoadError(f"GGUF tensor type {tensor.tensor_type.name} is not supported: {e}") from e
    # Quantized data arrive as rows of bytes; the logical shape is ggml's dims, innermost first.
    return w.reshape(tuple(int(d) for d in reversed(tensor.shape)))


def permute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation (HF half-split rope layout -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_rope_rows`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
