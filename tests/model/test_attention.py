"""Paged attention over a mixed batch (decodes, fresh prompts, chunks with cached context) against
a dense causal reference computed per sequence; and the batch-invariant mode's per-token attention,
bit for bit across chunkings and batch mates."""

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
    per_token_metadata,
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


# ---- the batch-invariant mode: every query token as a decode at its own context length ------------


def _attend_in_chunks(
    chunks: list[int],
    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    block: int,
    per_token: bool,
    seed: int,
) -> torch.Tensor:
    """One sequence's attention outputs, its tokens computed chunk by chunk (each chunk after the
    earlier ones, as cached context), each step batched with random other sequences: decodes before
    it and a prefill chunk after it. Returns [len, heads * dim] in position order."""
    q_all, k_all, v_all = qkv
    length, heads, dim = q_all.shape
    kv_heads = k_all.shape[1]
    rng = random.Random(seed)
    num_blocks = 256
    k_shape, v_shape = kv_cache_shapes(num_blocks, block, kv_heads, dim)
    k_cache, v_cache = torch.zeros(k_shape, dtype=q_all.dtype), torch.zeros(v_shape, dtype=q_all.dtype)
    free = list(range(num_blocks))
    rng.shuffle(free)
    own_blocks = [free.pop() for _ in range(-(-length // block))]
    outputs, done = [], 0
    for n in chunks:
        mates = [(rng.randrange(0, 30), 1) for _ in range(rng.randrange(0, 10))] + [(rng.randrange(0, 20), 7)]
        mate_slices, mate_k, mate_v = _sequences(mates, free, k_cache, v_cache)
        slices = [*mate_slices[:-1], SeqSlice(own_blocks, done, n), mate_slices[-1]]
        if n == 1:  # a 1-token slice is a decode: it goes among the decodes, anywhere
            slices.insert(rng.randrange(0, len(mates)), slices.pop(len(mates) - 1))
        own = slices.index(next(s for s in slices if s.block_ids is own_blocks))
        parts_q, parts_k, parts_v, start = [], [], [], 0
        for i, s in enumerate(slices):
            if i == own:
                start = sum(p.shape[0] for p in parts_q)
                parts_q.append(q_all[done : done + n])
                parts_k.append(k_all[done : done + n])
                parts_v.append(v_all[done : done + n])
                continue
            j = mate_slices.index(s)
            c = s.num_computed
            parts_q.append(torch.randn(s.query_len, heads, dim).to(q_all.dtype))
            parts_k.append(mate_k[j][c:])
            parts_v.append(mate_v[j][c:])
        q, k, v = torch.cat(parts_q), torch.cat(parts_k), torch.cat(parts_v)
        meta = build_metadata(slices, block, torch.device("cpu"))
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if per_token:
            meta = per_token_metadata(meta)
        out = paged_attention(q, k, v, k_cache, v_cache, meta, dim**-0.5)
        outputs.append(out[start : start + n])
        for s in mate_slices:  # the mates' blocks go back to the pool
            free.extend(s.block_ids)
        done += n
    return torch.cat(outputs)


CHUNKINGS = [[45], [1] * 45, [17, 17, 11], [5, 1, 39], [32, 13], [44, 1]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim,block", [(9, 3, 64, 16), (6, 2, 8, 4), (16, 2, 128, 16)])
def test_per_token_attention_is_bit_identical_in_any_chunking(dtype, heads, kv_heads, dim, block):
    """per_token_metadata: a token's attention output has the same bits whether its sequence's
    prompt came whole, as decodes, in chunks after cached context, among any batch mates, or on one
    thread; and it is causal attention (against a dense fp32 reference)."""
    if cpu_kernels() is None:
        pytest.skip("the batch-invariant mode needs the C++ CPU kernels")
    torch.manual_seed(0)
    length = 45
    qkv = (
        torch.randn(length, heads, dim).to(dtype),
        torch.randn(length, kv_heads, dim).to(dtype),
        torch.randn(length, kv_heads, dim).to(dtype),
    )
    whole = _attend_in_chunks([length], qkv, block, per_token=True, seed=0)
    for seed, chunks in enumerate(CHUNKINGS):
        assert torch.equal(_attend_in_chunks(chunks, qkv, block, True, seed + 1), whole), chunks
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(_attend_in_chunks([17, 17, 11], qkv, block, True, 9), whole)
    finally:
        torch.set_num_threads(threads)
    q, k, v = (t.float() for t in qkv)
    group = heads // kv_heads
    scores = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(group, 1)) * dim**-0.5
    scores = scores.masked_fill(torch.ones(length, length).triu(1).bool(), float("-inf"))
    expected = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.repeat_interleave(group, 1))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(whole.float(), expected.reshape(length, -1), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_attention_depends_on_the_chunking(dtype):
    """What per_token_metadata is for: by default a prefill chunk and a decode compute a token's
    attention with different kernels, so a prompt's tokens get other bits when it is chunked."""
    if cpu_kernels() is None:
        pytest.skip("the C++ CPU kernels could not be compiled here (see the logged warning)")
    torch.manual_seed(0)
    qkv = (
        torch.randn(45, 9, 64).to(dtype),
        torch.randn(45, 3, 64).to(dtype),
        torch.randn(45, 3, 64).to(dtype),
    )
    whole = _attend_in_chunks([45], qkv, 16, per_token=False, seed=0)
    assert not torch.equal(_attend_in_chunks([1] * 45, qkv, 16, per_token=False, seed=1), whole)
