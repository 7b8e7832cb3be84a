"""Token bitmasks: int32 [rows, ceil(vocab / 32)], bit b of word w allowing token 32 * w + b.

Applying one to logits unpacks it a byte at a time through a 256-entry table of additive rows (0 or
-inf for each of the byte's 8 tokens): one gather over vocab / 8 indices, several times faster than
shifting out every bit on the CPU.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch

_TABLES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allocate(rows: int, vocab_size: int) -> torch.Tensor:
    """A bitmask allowing nothing."""
    return torch.zeros(rows, words(vocab_size), dtype=torch.int32)


def allow_only(bitmask: torch.Tensor, row: int, token_ids: Iterable[int]) -> None:
    bitmask[row].zero_()
    for t in token_ids:
        word, bit = divmod(t, 32)
        if 0 <= word < bitmask.shape[1]:
            # int32 words: bit 31 set is a negative number
            value = (int(bitmask[row, word]) & 0xFFFFFFFF) | (1 << bit)
            bitmask[row, word] = value - (1 << 32) if value >= 1 << 31 else value


def allowed_ids(bitmask_row: torch.Tensor, vocab_size: int) -> list[int]:
    """The token ids a bitmask row allows (for checks and tests)."""
    return (
        torch.nonzero(additive(bitmask_row.unsqueeze(0), vocab_size, torch.float32)[0] == 0)
        .flatten()
        .tolist()
    )


def additive(bitmask: torch.Tensor, vocab_size: int, dtype: torch.dtype) -> torch.Tensor:
    """[rows, vocab_size] of 0 where a token is allowed and -inf where it is not."""
    if sys.byteorder != "little":  # the byte view below reads word bits 0-7 from the first byte
        raise RuntimeError("token bitmasks need a little-endian machine")
    rows, n_words = bitmask.shape
    if n_words * 32 < vocab_size:
        raise ValueError(f"a bitmask of {n_words} words cannot cover a vocabulary of {vocab_size}")
    table = _table(bitmask.device, dtype)
    as_bytes = bitmask.contiguous().view(torch.uint8).reshape(-1).long()
    return table.index_select(0, as_bytes).view(rows, n_words * 32)[:, :vocab_size]


def _table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    key = (device, dtype)
    table = _TABLES.get(key)
    if table is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        table = torch.zeros(256, 8, dtype=dtype).masked_fill(bits == 0, float("-inf")).to(device)
        _TABLES[key] = table
    return table
