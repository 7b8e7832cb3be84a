"""Which tensors a checkpoint stores, in which groups and order: the engine's runtime layout.

Groups follow the order the model is built in: the embedding, then each layer, then the final norm and
the LM head (none when tied: it is the embedding). Within a layer the fused projections are stored as
one tensor each, their Hugging Face parts stacked by rows (FUSED_PROJECTIONS in sutra/model/llama.py),
so the model's fusion finds the parts back to back and takes a view instead of a copy. Norms are stored
as the checkpoint has them (Gemma's less one); the model adds the offset its arch names when it loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from sutra.model.arch import ModelArch
from sutra.model.llama import FUSED_PROJECTIONS


@dataclass(frozen=True)
class StoredTensor:
    name: str  # the runtime name
    parts: tuple[str, ...]  # the Hugging Face weights it is made of, stacked by rows


@dataclass(frozen=True)
class Group:
    name: str
    tensors: tuple[StoredTensor, ...]


def _plain(name: str) -> StoredTensor:
    return StoredTensor(name, (name,))


def runtime_groups(arch: ModelArch) -> list[Group]:
    groups = [Group("embed", (_plain("model.embed_tokens.weight"),))]
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        tensors = [_plain(p + "input_layernorm.weight"), _plain(p + "post_attention_layernorm.weight")]
        if arch.sandwich_norms:
            tensors += [
                _plain(p + "pre_feedforward_layernorm.weight"),
                _plain(p + "post_feedforward_layernorm.weight"),
            ]
        for fused, parts in FUSED_PROJECTIONS.items():
            tensors.append(StoredTensor(p + fused + ".weight", tuple(p + n + ".weight" for n in parts)))
            if fused == "self_attn.qkv_proj":
                if arch.attention_bias:
                    tensors.append(StoredTensor(p + fused + ".bias", tuple(p + n + ".bias" for n in parts)))
                if arch.qk_norm:
                    tensors += [_plain(p + "self_attn.q_norm.weight"), _plain(p + "self_attn.k_norm.weight")]
                tensors.append(_plain(p + "self_attn.o_proj.weight"))
        tensors.append(_plain(p + "mlp.down_proj.weight"))
        groups.append(Group(f"layer.{i}", tuple(tensors)))
    head = [_plain("model.norm.weight")]
    if not arch.tie_word_embeddings:
        head.append(_plain("lm_head.weight"))
    groups.append(Group("head", tuple(head)))
    return groups
