"""Teacher-forced log-likelihood of a text under a built model: the accuracy check of a quantization.

The token sequence is prefilled through the model's own forward (paged attention over a KV cache of its
own, in chunks as the engine prefills), and every position's logits score the token that follows it.
"""

from __future__ import annotations

import math

import torch

from sutra.model.attention import SeqSlice, build_metadata, kv_cache_shapes
from sutra.model.llama import LlamaModel


@torch.inference_mode()
def token_logprobs(
    model: LlamaModel, token_ids: list[int], block_size: int = 16, chunk: int = 256
) -> torch.Tensor:
    """log p(token_ids[i] | token_ids[:i]) for i = 1 .. len - 1, as fp32 [len - 1]."""
    if len(token_ids) < 2:
        raise ValueError("a log-likelihood needs at least 2 tokens")
    if chunk < 1 or block_size < 1:
        raise ValueError(f"chunk and block_size must be >= 1, got {chunk} and {block_size}")
    a, device = model.arch, model.device
    blocks = -(-len(token_ids) // block_size)
    k_shape, v_shape = kv_cache_shapes(blocks, block_size, a.num_kv_heads, a.head_dim)
    caches = [
        (
            torch.zeros(k_shape, dtype=model.dtype, device=device),
            torch.zeros(v_shape, dtype=model.dtype, device=device),
        )
        for _ in range(a.num_layers)
    ]
    block_ids = list(range(blocks))
    ids = torch.tensor(token_ids, dtype=torch.long, device=device)
    out: list[torch.Tensor] = []
    for start in range(0, len(token_ids) - 1, chunk):
        n = min(chunk, len(token_ids) - 1 - start)  # the last token is only ever a target
        meta = build_metadata([SeqSlice(block_ids, start, n)], block_size, device)
        positions = torch.arange(start, start + n, device=device)
        hidden = model.forward(ids[start : start + n], positions, meta, caches)
        logprobs = torch.log_softmax(model.compute_logits(hidden).float(), dim=-1)
        out.append(logprobs.gather(1, ids[start + 1 : start + n + 1, None])[:, 0])
    return torch.cat(out).cpu()


def perplexity(model: LlamaModel, token_ids: list[int], block_size: int = 16, chunk: int = 256) -> float:
    """exp of the mean negative log-likelihood of every token after the first."""
    return math.exp(-token_logprobs(model, token_ids, block_size, chunk).mean().item())
