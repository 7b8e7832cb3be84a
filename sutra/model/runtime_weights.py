"""The weights a built model runs with, under Hugging Face names, to build it again without its source.

A server that evicts an idle model keeps these in host memory (its host cache): building the model
again from them skips the disk and the source's conversion. They are views of the model's own tensors
(the fused q|k|v and gate|up split back into row slices), so on CPU keeping them costs no copy, and
building from them fuses the slices back into the same memory (`cat_rows` sees them back to back).

Only weights that are still plain tensors can be given back: oneDNN-packed bf16 matrices and the
batch-invariant mode's tiles have no public inverse, int8-quantized weights are not the loaded ones,
and other families' models transform some weights at load. For those `export_weights` answers None,
and a caller keeps the loaded weights instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping

import torch

from sutra.model.hf_dir import expected_shapes
from sutra.model.linear import Linear
from sutra.model.llama import FUSED_PROJECTIONS, LlamaModel


def export_weights(model: object) -> dict[str, torch.Tensor] | None:
    """HF-named views of a plain LlamaModel's weights, or None if they cannot be given back exactly."""
    if type(model) is not LlamaModel or model.batch_invariant or getattr(model, "quantization", None):
        return None
    arch = model.arch
    if getattr(arch, "norm_weight_offset", 0.0) or not getattr(arch, "is_plain_llama", lambda: True)():
        return None
    q = arch.num_heads * arch.head_dim
    kv = arch.num_kv_heads * arch.head_dim
    split_rows = {"self_attn.qkv_proj": (q, kv, kv), "mlp.gate_up_proj": (arch.intermediate_size,) * 2}
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": model.embed, "model.norm.weight": model.norm}
    if not arch.tie_word_embeddings:
        head = _plain(model.lm_head)
        if head is None:
            return None
        out["lm_head.weight"] = head
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = layer.input_norm
        out[p + "post_attention_layernorm.weight"] = layer.post_norm
        fused = {"self_attn.qkv_proj": layer.qkv, "mlp.gate_up_proj": layer.gate_up}
        for fused_name, linear in fused.items():
            weight = _plain(linear)
            if weight is None:
                return None
            for part, piece in zip(
                FUSED_PROJECTIONS[fused_name], weight.split(split_rows[fused_name]), strict=True
            ):
                out[f"{p}{part}.weight"] = piece
        if layer.qkv.bias is not None:
            for part, piece in zip(
                FUSED_PROJECTIONS["self_attn.qkv_proj"], layer.qkv.bias.split((q, kv, kv)), strict=True
            ):
                out[f"{p}{part}.bias"] = piece
        for name, linear in (("self_attn.o_proj", layer.o), ("mlp.down_proj", layer.down)):
            weight = _plain(linear)
            if weight is None:
                return None
            out[f"{p}{name}.weight"] = weight
    # Every weight the architecture has, each of its shape: else this model holds something more.
    shapes = expected_shapes(arch)
    if out.keys() != shapes.keys() or any(tuple(out[n].shape) != s for n, s in shapes.items()):
        return None
    return out


def _plain(linear: object) -> torch.Tensor | None:
    """A Linear's weight as the model was given it, unless the backend repacked it."""
    if type(linear) is not Linear or linear.packed:
        return None
    return linear.weight


def to_host(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights in host memory: CPU tensors as they are, others copied (once per storage, so views of
    one fused tensor stay views of one host copy)."""
    copies: dict[tuple[torch.device, int], torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        if tensor.device.type == "cpu":
            out[name] = tensor
            continue
        storage = tensor.untyped_storage()
        if storage.nbytes() % tensor.element_size():
            out[name] = tensor.cpu()
            continue
        key = (tensor.device, storage.data_ptr())
        base = copies.get(key)
        if base is None:
            whole = torch.empty(0, dtype=tensor.dtype, device=tensor.device).set_(storage)
            base = copies[key] = whole.cpu()
        out[name] = base.as_strided(tensor.shape, tensor.stride(), tensor.storage_offset())
    return out


def tensors_in(obj: object, *, max_depth: int = 8) -> Iterator[torch.Tensor]:
    """Every tensor reachable from obj through lists, tuples, dicts and Sutra's own objects."""
    seen: set[int] = set()
    stack: list[tuple[object, int]] = [(obj, 0)]
    while stack:
        item, depth = stack.pop()
        if id(item) in seen or depth > max_depth:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            yield item
        elif isinstance(item, Mapping):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend((v, depth + 1) for v in item)
        elif type(item).__module__.startswith("sutra.") and hasattr(item, "__dict__"):
            stack.extend((v, depth + 1) for v in vars(item).values())


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """The memory the tensors hold: each underlying storage counted once, however many views share it."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in tensors:
        try:
            storage = tensor.untyped_storage()
            key = (str(tensor.device), storage.data_ptr())
            nbytes = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # an opaque tensor: count its elements
            key = (str(tensor.device), id(tensor))
            nbytes = math.prod(tensor.shape) * tensor.element_size()
        if key not in seen:
            seen.add(key)
            total += nbytes
    return total
