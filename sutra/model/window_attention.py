"""Paged attention with a sliding window and/or soft-capped scores (Gemma 2/3), in torch.

The same paged cache and metadata as attention.py. A sliding layer lets a query at position p see the
keys at positions p - window < j <= p (transformers' sliding_window_overlay); the cache keeps every
block, and the window is a mask. Soft-capping bends the scaled scores to cap * tanh(scores / cap)
before the mask and the softmax, as transformers' eager attention does; SDPA cannot, so capped layers
compute the scores explicitly. The C++ kernels do neither, so these layers always run here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sutra.model.attention import AttentionMetadata, gather_kv


def window_attention(
    q: torch.Tensor,  # [T, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, head_dim, block_size]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    meta: AttentionMetadata,
    scale: float,
    window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """Attends over the cache, which already holds the new K/V. Returns [T, num_heads * head_dim]."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = v_cache.shape[2]
    group = num_heads // num_kv_heads
    out = q.new_empty(q.shape)
    d = meta.num_decodes
    if d:
        table = meta.decode_block_table
        ctx = table.shape[1] * v_cache.shape[1]
        kb, vb = gather_kv(k_cache, v_cache, table.view(-1))
        kb = kb.view(d, ctx, num_kv_heads, head_dim).transpose(1, 2).unsqueeze(2)  # [d, KV, 1, ctx, D]
        vb = vb.view(d, ctx, num_kv_heads, head_dim).transpose(1, 2).unsqueeze(2)
        qd = q[:d].view(d, num_kv_heads, group, 1, head_dim)
        keys = torch.arange(ctx, device=q.device)
        allowed = _allowed(meta.decode_seq_lens - 1, keys, window)  # [d, ctx]
        o = _attend(qd, kb, vb, allowed[:, None, None, None, :], scale, softcap)
        out[:d] = o.reshape(d, num_heads, head_dim)
    for p in meta.prefills:
        n = p.end - p.start
        ks, vs = gather_kv(k_cache, v_cache, p.block_ids)
        kh = ks[: p.context_len].transpose(0, 1).unsqueeze(1)  # [KV, 1, ctx, D]
        vh = vs[: p.context_len].transpose(0, 1).unsqueeze(1)
        qh = q[p.start : p.end].view(n, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)  # [KV, G, n, D]
        positions = torch.arange(p.context_len - n, p.context_len, device=q.device)
        allowed = _allowed(positions, torch.arange(p.context_len, device=q.device), window)  # [n, ctx]
        o = _attend(qh, kh, vh, allowed, scale, softcap)
        out[p.start : p.end] = o.permute(2, 0, 1, 3).reshape(n, num_heads, head_dim)
    return out.view(num_tokens, num_heads * head_dim)


def _allowed(positions: torch.Tensor, keys: torch.Tensor, window: int | None) -> torch.Tensor:
    """[len(positions), len(keys)]: causal, and within the window when there is one."""
    allowed = keys[None, :] <= positions[:, None]
    if window is not None:
        allowed &= keys[None, :] > positions[:, None] - window
    return allowed


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """softmax(q k^T * scale, over the allowed keys) v, with k and v broadcast over q's query-head groups."""
    if softcap is None:
        k, v = k.expand(*q.shape[:-2], *k.shape[-2:]), v.expand(*q.shape[:-2], *v.shape[-2:])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)
