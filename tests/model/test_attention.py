"""Paged attention over a mixed batch (decodes, fresh prompts, chunks with cached context) against
a dense causal reference computed per sequence."""

from __future__ import annotations

import random

import pytest
import torch

from sutra.model import attention
from sutra.model.attention import (
    SeqSlice,
    build_metadata,
    gather_kv,
    kv_cache_shapes,
    paged_attention,
    write_kv,
)
from sutra.model.cpu_kernels import cpu_kernels

BLOCK = 4
HEADS, KV_HEADS, DIM = 6, 2, 8


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_cached: int) -> torch.Tensor:
    """q: [n, H, D] for positions num_cached.., k/v: [ctx, KVH, D] for positions 0..ctx."""
    group = HEADS // KV_HEADS
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * DIM**-0.5
    q_pos = torch.arange(num_cached, num_cached + q.shape[0])[:, None]
    scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(q.shape[0], HEADS * DIM)


def _sequences(
    shapes: list[tuple[int, int]], free: list[int], k_cache: torch.Tensor, v_cache: torch.Tensor
) -> tuple[list[SeqSlice], list[torch.Tensor], list[torch.Tensor]]:
    """For each (cached, new) shape: blocks from `free`, random K/V for all its tokens, and the cached
    part already written to the cache, as earlier steps would have. Returns the slices and full K/V."""
    block = v_cache.shape[1]
    slices, full_k, full_v = [], [], []
    for cached, new in shapes:
        blocks = [free.pop() for _ in range(-(-(cached + new) // block))]
        ks = torch.randn(cached + new, *v_cache.shape[2:], dtype=v_cache.dtype)
        vs = torch.randn(cached + new, *v_cache.shape[2:], dtype=v_cache.dtype)
        slots = torch.tensor(
            [blocks[p // block] * block + p % block for p in range(cached)], dtype=torch.long
        )
        write_kv(ks[:cached], vs[:cached], k_cache, v_cache, slots)
        slices.append(SeqSlice(blocks, cached, new))
        full_k.append(ks)
        full_v.append(vs)
    return slices, full_k, full_v


@pytest.fixture(params=["torch", "cpu_kernel"])
def backend(request, monkeypatch):
    """Both decode paths: the C++ kernel (compiled on first use) and the pure-torch one."""
    if request.param == "torch":
        monkeypatch.setattr(attention, "cpu_kernels", lambda: None)
    elif cpu_kernels() is None:
        pytest.skip("the C++ CPU kernels could not be compiled here (see the logged warning)")
    return request.param


@pytest.mark.parametrize("seed,block", [(0, 4), (1, 4), (2, 16), (3, 16)])
def test_mixed_batch_matches_dense_reference(seed, block, backend):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    num_blocks = 64
    k_shape, v_shape = kv_cache_shapes(num_blocks, block, KV_HEADS, DIM)
    k_cache, v_cache = torch.zeros(k_shape), torch.zeros(v_shape)
    free = list(range(num_blocks))
    rng.shuffle(free)
    # (cached tokens, new tokens): decodes first, then a fresh prompt and chunks after cached context.
    shapes = [(rng.randrange(0, 20), 1) for _ in range(3)] + [(0, 9), (7, 5), (12, 1 + rng.randrange(1, 6))]
    slices, full_k, full_v = _sequences(shapes, free, k_cache, v_cache)
    q = torch.randn(sum(n for _, n in shapes), HEADS, DIM)
    k_new = torch.cat([ks[c:] for ks, (c, _) in zip(full_k, shapes, strict=True)])
    v_new = torch.cat([vs[c:] for vs, (c, _) in zip(full_v, shapes, strict=True)])
    meta = build_metadata(slices, block, torch.device("cpu"))
    assert meta.num_decodes == 3
    write_kv(k_new, v_new, k_cache, v_cache, meta.slot_mapping)
    out = paged_attention(q, k_new, v_new, k_cache, v_cache, meta, DIM**-0.5)
    start = 0
    for (cached, new), ks, vs in zip(shapes, full_k, full_v, strict=True):
        expected = _reference(q[start : start + new], ks, vs, cached)
        torch.testing.assert_close(out[start : start + new], expected, rtol=1e-5, atol=1e-5)
        start += new
    # Every K/V landed in the cache at its slot.
    for s, ks, vs in zip(slices, full_k, full_v, strict=True):
        cached_k, cached_v = gather_kv(k_cache, v_cache, torch.tensor(s.block_ids))
        n = s.num_computed + s.query_len
        torch.testing.assert_close(cached_k[:n], ks)
        torch.testing.assert_close(cached_v[:n], vs)


def test_bf16_decode_kernel_matches_torch_path(monkeypatch):
    if cpu_kernels() is None:
        pytest.skip("the C++ CPU kernels could not be compiled here (see the logged warning)")
    torch.manual_seed(0)
    k_shape, v_shape = kv_cache_shapes(32, BLOCK, KV_HEADS, DIM)
    k_cache, v_cache = torch.randn(k_shape, dtype=torch.bfloat16), torch.randn(v_shape, dtype=torch.bfloat16)
    slices = [SeqSlice([3, 9, 1, 30, 7], 17, 1), SeqSlice([5], 0, 1), SeqSlice([11, 2], 6, 1)]
    meta = build_metadata(slices, BLOCK, torch.device("cpu"))
    q = torch.randn(3, HEADS, DIM, dtype=torch.bfloat16)
    k, v = (
        torch.randn(3, KV_HEADS, DIM, dtype=torch.bfloat16),
        torch.randn(3, KV_HEADS, DIM, dtype=torch.bfloat16),
    )
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    fast = paged_attention(q, k, v, k_cache, v_cache, meta, DIM**-0.5)
    monkeypatch.setattr(attention, "cpu_kernels", lambda: None)
    slow = paged_attention(q, k, v, k_cache, v_cache, meta, DIM**-0.5)
    torch.testing.assert_close(fast.float(), slow.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (16, 2, 128), (4, 4, 64)])
def test_decode_kernel_on_16_token_blocks_matches_torch_path(heads, kv_heads, dim, dtype, monkeypatch):
    """The C++ decode kernel's vectorized path (16-token blocks, head_dim 64 or 128), with several
    sequences per thread and lengths that end mid-block, against the torch path."""
    if cpu_kernels() is None:
        pytest.skip("the C++ CPU kernels could not be compiled here (see the logged warning)")
    torch.manual_seed(0)
    block, num_blocks = 16, 96
    k_shape, v_shape = kv_cache_shapes(num_blocks, block, kv_heads, dim)
    k_cache, v_cache = torch.randn(k_shape, dtype=dtype), torch.randn(v_shape, dtype=dtype)
    free = list(range(num_blocks))
    random.Random(0).shuffle(free)
    lengths = [1, 15, 16, 17, 40, 100, 64, 3, 130]  # tokens cached before this step's token
    slices = [SeqSlice([free.pop() for _ in range(n // block + 1)], n, 1) for n in lengths]
    meta = build_metadata(slices, block, torch.device("cpu"))
    q = torch.randn(len(lengths), heads, dim, dtype=dtype)
    k = torch.randn(len(lengths), kv_heads, dim, dtype=dtype)
    v = torch.randn(len(lengths), kv_heads, dim, dtype=dtype)
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    fast = paged_attention(q, k, v, k_cache, v_cache, meta, dim**-0.5)
    monkeypatch.setattr(attention, "cpu_kernels", lambda: None)
    slow = paged_attention(q, k, v, k_cache, v_cache, meta, dim**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fast.float(), slow.float(), rtol=tol, atol=tol)


def _needs_bf16_prefill_kernel() -> None:
    kernels = cpu_kernels()
    if kernels is None:
        pytest.skip("the C++ CPU kernels could not be compiled here (see the logged warning)")
    if not kernels.prefill_attention_supports(9, 3, 64, 16):
        pytest.skip("the bf16 prefill kernel needs a CPU with AVX512-BF16")


@pytest.mark.parametrize(
    "heads,kv_heads,dim,block,shapes",
    [
        (9, 3, 64, 16, [(0, 37), (20, 1), (0, 1), (45, 19)]),  # SmolLM2's grouping; chunks after cache
        (4, 4, 32, 16, [(0, 16), (16, 16), (3, 40)]),  # no grouping, tile-aligned contexts
        (16, 2, 128, 32, [(0, 70), (33, 5)]),  # 8 query heads per KV head, head_dim 128, 32-token blocks
        (12, 1, 64, 16, [(10, 30)]),  # 12 query heads on one KV head
    ],
)
def test_bf16_prefill_kernel_matches_fp32_reference(heads, kv_heads, dim, block, shapes):
    """The AVX512-BF16 prefill kernel, reached through paged_attention, against fp32 attention on the
    same bf16 values: within bf16 rounding of the output."""
    _needs_bf16_prefill_kernel()
    torch.manual_seed(0)
    k_shape, v_shape = kv_cache_shapes(64, block, kv_heads, dim)
    k_cache = torch.zeros(k_shape, dtype=torch.bfloat16)
    v_cache = torch.zeros(v_shape, dtype=torch.bfloat16)
    free = list(range(64))
    random.Random(0).shuffle(free)
    slices, full_k, full_v = _sequences(shapes, free, k_cache, v_cache)
    # A 1-token chunk after cached context counts as a decode; keep the batch order the runner uses.
    order = sorted(range(len(shapes)), key=lambda i: shapes[i][1] != 1)
    slices = [slices[i] for i in order]
    shapes, full_k, full_v = (
        [shapes[i] for i in order],
        [full_k[i] for i in order],
        [full_v[i] for i in order],
    )
    q = torch.randn(sum(n for _, n in shapes), heads, dim, dtype=torch.bfloat16)
    k_new = torch.cat([ks[c:] for ks, (c, _) in zip(full_k, shapes, strict=True)])
    v_new = torch.cat([vs[c:] for vs, (c, _) in zip(full_v, shapes, strict=True)])
    meta = build_metadata(slices, block, torch.device("cpu"))
    write_kv(k_new, v_new, k_cache, v_cache, meta.slot_mapping)
    out = paged_attention(q, k_new, v_new, k_cache, v_cache, meta, dim**-0.5).float()
    group, start = heads // kv_heads, 0
    for (cached, new), ks, vs in zip(shapes, full_k, full_v, strict=True):
        qs = q[start : start + new].float()
        kk, vv = ks.float().repeat_interleave(group, 1), vs.float().repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", qs, kk) * dim**-0.5
        q_pos = torch.arange(cached, cached + new)[:, None]
        scores = scores.masked_fill(torch.arange(cached + new)[None, :] > q_pos, float("-inf"))
        expected = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv).reshape(new, heads * dim)
        torch.testing.assert_close(out[start : start + new], expected, rtol=2e-2, atol=2e-2)
        start += new
