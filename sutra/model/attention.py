"""Paged attention over a flattened batch that mixes decodes and prefill chunks (torch backend).

The KV cache of a layer is a pair of tensors: K [num_blocks, num_kv_heads, head_dim, block_size]
(each block transposed, so a decode scores a whole block per vector op) and V [num_blocks,
block_size, num_kv_heads, head_dim].
Decodes (query length 1) run in one batched call: on CPU a C++ kernel that reads each cached row
once from its block (cpu_kernels.py); elsewhere, or without a compiler, a torch path that gathers
whole blocks (index_select over block ids, ~10x faster than gathering token slots) and folds the
query heads that share a KV head into one SDPA call. Prefill chunks run one call each: in bf16 on
CPUs with AVX512-BF16 a C++ kernel that reads the context from the paged cache (3x torch's SDPA),
otherwise SDPA.
In the batch-invariant mode (per_token_metadata) every token of a prefill chunk runs as a decode at
its own context length, so its attention is computed the same way whether it came in a chunk of any
size, after any cached prefix, or alone.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from sutra.model.cpu_kernels import cpu_kernels


@dataclass
class SeqSlice:
    """One sequence's part of the batch: query_len new tokens after num_computed cached ones."""

    block_ids: list[int]
    num_computed: int
    query_len: int


@dataclass
class PrefillSlice:
    start: int  # token range [start, end) in the flattened batch
    end: int
    context_len: int  # cached tokens + this chunk
    block_ids: torch.Tensor  # the blocks holding the context, this chunk's own tokens included

    @functools.cached_property
    def mask(self) -> torch.Tensor | None:
        """[query_len, context_len] allow-mask for the SDPA path; None when the chunk is all of its
        context (plain causal). Built on first use, once per step: the C++ kernel needs none."""
        if self.context_len == self.end - self.start:
            return None
        device = self.block_ids.device
        q_pos = torch.arange(self.context_len - (self.end - self.start), self.context_len, device=device)
        return torch.arange(self.context_len, device=device)[None, :] <= q_pos[:, None]


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] flat cache slot each new token's K/V is written to
    num_decodes: int  # the first num_decodes tokens are 1-token slices
    decode_block_table: torch.Tensor | None  # [num_decodes, max_blocks]
    decode_seq_lens: torch.Tensor | None  # [num_decodes] context length including the new token
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_blocks * block_size]; None if all full
    prefills: list[PrefillSlice]


def build_metadata(slices: list[SeqSlice], block_size: int, device: torch.device) -> AttentionMetadata:
    """Slices must list every 1-token slice first, in the order of the flattened batch."""
    slots: list[int] = []
    for s in slices:
        for pos in range(s.num_computed, s.num_computed + s.query_len):
            slots.append(s.block_ids[pos // block_size] * block_size + pos % block_size)
    num_decodes = 0
    while num_decodes < len(slices) and slices[num_decodes].query_len == 1:
        num_decodes += 1
    table = mask = lens = None
    if num_decodes:
        decodes = slices[:num_decodes]
        seq_lens = [s.num_computed + 1 for s in decodes]
        max_blocks = -(-max(seq_lens) // block_size)
        rows = [s.block_ids[: -(-n // block_size)] for s, n in zip(decodes, seq_lens, strict=True)]
        table = torch.tensor([r + [0] * (max_blocks - len(r)) for r in rows], dtype=torch.long)
        lens = torch.tensor(seq_lens)
        if any(n != max_blocks * block_size for n in seq_lens):
            mask = (torch.arange(max_blocks * block_size)[None, :] < lens[:, None])[:, None, None, :]
            mask = mask.to(device)
        table, lens = table.to(device), lens.to(device)
    prefills = []
    start = num_decodes
    for s in slices[num_decodes:]:
        ctx = s.num_computed + s.query_len
        block_ids = torch.tensor(s.block_ids[: -(-ctx // block_size)], dtype=torch.long, device=device)
        prefills.append(PrefillSlice(start, start + s.query_len, ctx, block_ids))
        start += s.query_len
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        num_decodes=num_decodes,
        decode_block_table=table,
        decode_seq_lens=lens,
        decode_mask=mask,
        prefills=prefills,
    )


def per_token_metadata(meta: AttentionMetadata) -> AttentionMetadata:
    """The same batch with every prefill token as a 1-token slice: query i of a chunk over context
    [0, context_len) attends as a decode with context length context_len - chunk_len + i + 1 (its
    position + 1), over the chunk's blocks (the cache holds the chunk's K/V before attention runs).
    The C++ decode kernel computes each row alone, in an order that depends only on its context
    length; its rows need no padding mask (the torch decode path is not used in this mode)."""
    if not meta.prefills:
        return meta
    tables: list[torch.Tensor] = []
    lens: list[torch.Tensor] = []
    if meta.num_decodes:
        tables.append(meta.decode_block_table)
        lens.append(meta.decode_seq_lens)
    for p in meta.prefills:
        n = p.end - p.start
        tables.append(p.block_ids.expand(n, -1))
        lens.append(torch.arange(p.context_len - n + 1, p.context_len + 1, device=p.block_ids.device))
    width = max(t.shape[1] for t in tables)
    table = torch.cat([F.pad(t, (0, width - t.shape[1])) for t in tables])
    return AttentionMetadata(
        slot_mapping=meta.slot_mapping,
        num_decodes=table.shape[0],
        decode_block_table=table,
        decode_seq_lens=torch.cat(lens),
        decode_mask=None,
        prefills=[],
    )


def kv_cache_shapes(
    num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
) -> tuple[tuple, tuple]:
    return (num_blocks, num_kv_heads, head_dim, block_size), (num_blocks, block_size, num_kv_heads, head_dim)


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store the new tokens' K/V [T, num_kv_heads, head_dim] at their flat cache slots."""
    block_size = v_cache.shape[1]
    k_cache[slot_mapping // block_size, :, :, slot_mapping % block_size] = k
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v)


def gather_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """K and V of whole blocks as [len(block_ids) * block_size, num_kv_heads, head_dim] each."""
    _, num_kv_heads, head_dim, _ = k_cache.shape
    k = k_cache.index_select(0, block_ids).permute(0, 3, 1, 2).reshape(-1, num_kv_heads, head_dim)
    v = v_cache.index_select(0, block_ids).view(-1, num_kv_heads, head_dim)
    return k, v


def paged_attention(
    q: torch.Tensor,  # [T, num_heads, head_dim]
    k: torch.Tensor,  # [T, num_kv_heads, head_dim]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, head_dim, block_size]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attends over the cache, which already holds the new K/V (see write_kv). k and v are the new
    tokens' own, used directly by prefill chunks that have no cached context.
    Returns [T, num_heads * head_dim]."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    d = meta.num_decodes
    decoded = _decode_attention(q[:d], k_cache, v_cache, meta, scale) if d else None
    if not meta.prefills:
        return decoded.reshape(num_tokens, num_heads * head_dim)
    out = q.new_empty(q.shape)
    if d:
        out[:d] = decoded
    kernels = _bf16_prefill_kernels(q, k_cache)
    for p in meta.prefills:
        qs = q[p.start : p.end]
        n = p.end - p.start
        if kernels is not None:
            out[p.start : p.end] = kernels.prefill_attention(
                qs, k_cache, v_cache, p.block_ids, p.context_len, scale
            )
            continue
        if p.mask is None:
            ks, vs = k[p.start : p.end], v[p.start : p.end]
        else:
            ks, vs = gather_kv(k_cache, v_cache, p.block_ids)
            ks, vs = ks[: p.context_len], vs[: p.context_len]
        qh = qs.view(n, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
        kh = ks.transpose(0, 1).unsqueeze(1).expand(num_kv_heads, group, p.context_len, head_dim)
        vh = vs.transpose(0, 1).unsqueeze(1).expand(num_kv_heads, group, p.context_len, head_dim)
        o = F.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=p.mask, is_causal=p.mask is None, scale=scale
        )
        out[p.start : p.end] = o.permute(2, 0, 1, 3).reshape(n, num_heads, head_dim)
    return out.view(num_tokens, num_heads * head_dim)


def _bf16_prefill_kernels(q: torch.Tensor, k_cache: torch.Tensor) -> ModuleType | None:
    """The C++ kernels when the bf16 prefill kernel covers these shapes, else None."""
    if q.device.type != "cpu" or q.dtype != torch.bfloat16:
        return None
    _, num_kv_heads, head_dim, block_size = k_cache.shape
    kernels = cpu_kernels()
    if kernels is None or not kernels.prefill_attention_supports(
        q.shape[1], num_kv_heads, head_dim, block_size
    ):
        return None
    return kernels


def _decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """The 1-token slices, batched: [num_decodes, num_heads, head_dim]."""
    d, num_heads, head_dim = q.shape
    kernels = cpu_kernels() if q.device.type == "cpu" else None
    if kernels is not None:
        return kernels.decode_attention(
            q, k_cache, v_cache, meta.decode_block_table, meta.decode_seq_lens, scale
        )
    num_kv_heads = v_cache.shape[2]
    table = meta.decode_block_table
    ctx = table.shape[1] * v_cache.shape[1]
    kb, vb = gather_kv(k_cache, v_cache, table.view(-1))
    kb = kb.view(d, ctx, num_kv_heads, head_dim).transpose(1, 2)
    vb = vb.view(d, ctx, num_kv_heads, head_dim).transpose(1, 2)
    # Fold the query heads of one KV head into the query-length axis: one GEMM-shaped call.
    qd = q.view(d, num_kv_heads, num_heads // num_kv_heads, head_dim)
    o = F.scaled_dot_product_attention(qd, kb, vb, attn_mask=meta.decode_mask, scale=scale)
    return o.reshape(d, num_heads, head_dim)
