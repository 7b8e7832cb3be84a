"""The table-driven bitmask unpacking agrees with reading every bit, bit 31 (the int32 sign) included."""

from __future__ import annotations

import torch

from sutra.structured import bitmask


def reference(mask: torch.Tensor, vocab: int) -> torch.Tensor:
    out = torch.full((mask.shape[0], vocab), float("-inf"))
    for r in range(mask.shape[0]):
        for t in range(vocab):
            if (int(mask[r, t // 32]) >> (t % 32)) & 1:
                out[r, t] = 0.0
    return out


def test_additive_matches_every_bit_read_one_by_one():
    gen = torch.Generator().manual_seed(0)
    vocab = 100  # not a multiple of 32: the last word's spare bits are ignored
    mask = torch.randint(-(2**31), 2**31 - 1, (3, bitmask.words(vocab)), dtype=torch.int32, generator=gen)
    mask[0, 0] = -(2**31)  # only bit 31
    assert torch.equal(bitmask.additive(mask, vocab, torch.float32), reference(mask, vocab))
    assert bitmask.additive(mask, vocab, torch.bfloat16).dtype == torch.bfloat16


def test_allow_only_and_allowed_ids_round_trip():
    mask = bitmask.allocate(2, 70)
    assert mask.shape == (2, 3) and bitmask.allowed_ids(mask[0], 70) == []
    bitmask.allow_only(mask, 1, [0, 31, 32, 63, 69])
    assert bitmask.allowed_ids(mask[1], 70) == [0, 31, 32, 63, 69]
    assert bitmask.allowed_ids(mask[0], 70) == []
    bitmask.allow_only(mask, 1, [5])  # replaces, not adds
    assert bitmask.allowed_ids(mask[1], 70) == [5]
