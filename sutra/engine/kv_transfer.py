"""Whole KV cache blocks out of one paged cache and into another: what live migration moves.

A block is the unit: both K and V caches are block-major (see `kv_cache_shapes`), so one block of
one layer is a single contiguous run of bytes. Exported blocks travel as one numpy uint8 array of
shape [n_blocks, num_layers, 2, block_bytes] (index 0 of the third axis is K, 1 is V): uint8 because
bfloat16 has no numpy dtype, numpy because Ray's object store hands numpy arrays over without a
copy. The bytes mean something only in the layout they were written in, so they travel with a
`KVLayout`, and an import into a cache of any other layout is refused.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from sutra.errors import SutraError
from sutra.model.attention import kv_cache_shapes


class KVLayoutMismatchError(SutraError):
    """KV blocks were exported from a cache whose layout differs from the destination's."""

    def __init__(self, message: str, fields: tuple[str, ...]) -> None:
        super().__init__(message)
        self.fields = fields


def _block_layouts() -> tuple[str, str]:
    """The axis order of one K block and one V block, read off `kv_cache_shapes` itself (with
    distinct sizes per axis) so the signature changes whenever the cache layout does."""
    names = {3: "block_size", 5: "num_kv_heads", 7: "head_dim"}
    k_shape, v_shape = kv_cache_shapes(2, 3, 5, 7)
    return ",".join(names[s] for s in k_shape[1:]), ",".join(names[s] for s in v_shape[1:])


@dataclass(frozen=True)
class KVLayout:
    """What must agree between two caches for their blocks' bytes to mean the same thing."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str  # "float32", "bfloat16", ...
    k_block_layout: str  # axes of one K block, e.g. "num_kv_heads,head_dim,block_size"
    v_block_layout: str
    block_bytes: int  # bytes of one block of one layer's K (V is the same size)

    @classmethod
    def create(
        cls, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype
    ) -> KVLayout:
        k_layout, v_layout = _block_layouts()
        return cls(
            num_layers=num_layers,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            block_size=block_size,
            dtype=str(dtype).removeprefix("torch."),
            k_block_layout=k_layout,
            v_block_layout=v_layout,
            block_bytes=block_size * num_kv_heads * head_dim * dtype.itemsize,
        )

    def check_matches(self, other: KVLayout) -> None:
        """Raise KVLayoutMismatchError naming every field where `other` (the destination) differs."""
        differ = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]
        if differ:
            detail = ", ".join(f"{n} ({getattr(self, n)!r} vs {getattr(other, n)!r})" for n in differ)
            raise KVLayoutMismatchError(
                f"KV layouts differ (exported vs destination): {detail}", fields=tuple(differ)
            )


@dataclass
class KVBlocks:
    """Exported KV blocks: data is uint8 [n_blocks, num_layers, 2 (K, V), layout.block_bytes]."""

    layout: KVLayout
    data: np.ndarray

    @property
    def n_blocks(self) -> int:
        return self.data.shape[0]


def _byte_rows(cache: torch.Tensor) -> torch.Tensor:
    """A cache tensor as [num_blocks, block_bytes] uint8, sharing its memory."""
    return cache.view(cache.shape[0], -1).view(torch.uint8)


def _check_block_ids(kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_ids: list[int]) -> None:
    # Checked here, not left to the index ops: on CUDA a bad index is a device assert that ends
    # the process's CUDA context.
    if not kv_caches:
        raise ValueError("the KV cache is not allocated")
    num_blocks = kv_caches[0][0].shape[0]
    if min(block_ids) < 0 or max(block_ids) >= num_blocks:
        raise ValueError(f"block ids must be in [0, {num_blocks}), got {min(block_ids)}..{max(block_ids)}")


def gather_blocks(
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_ids: list[int], layout: KVLayout
) -> KVBlocks:
    """Copy whole blocks of every layer into one contiguous CPU array."""
    n = len(block_ids)
    # numpy asks the kernel for huge pages on large arrays, torch.empty does not: filling a fresh
    # array ran ~5x faster (the page faults dominate a one-pass copy).
    data = np.empty((n, layout.num_layers, 2, layout.block_bytes), dtype=np.uint8)
    if not n:
        return KVBlocks(layout=layout, data=data)
    _check_block_ids(kv_caches, block_ids)
    device = kv_caches[0][0].device
    if device.type == "cpu":
        # numpy's row copies, single-threaded: torch's parallel index_select stalled for ms per
        # call on a busy 2-core machine (0.2 GB/s against numpy's 5).
        ids = np.asarray(block_ids, dtype=np.int64)
        for layer, (k, v) in enumerate(kv_caches):
            data[:, layer, 0] = _byte_rows(k).numpy()[ids]
            data[:, layer, 1] = _byte_rows(v).numpy()[ids]
        return KVBlocks(layout=layout, data=data)
    # Gathered on the device, then across to the host in one copy.
    staging = torch.empty(data.shape, dtype=torch.uint8, device=device)
    idx = torch.tensor(block_ids, dtype=torch.long, device=device)
    for layer, (k, v) in enumerate(kv_caches):
        torch.index_select(_byte_rows(k), 0, idx, out=staging[:, layer, 0])
        torch.index_select(_byte_rows(v), 0, idx, out=staging[:, layer, 1])
    torch.from_numpy(data).copy_(staging)
    return KVBlocks(layout=layout, data=data)


def _as_tensor(data: np.ndarray) -> torch.Tensor:
    """A tensor over the array's memory, never written to. A read-only array (as Ray returns from
    its object store) is wrapped all the same: torch warns that writes would be undefined, and
    nothing here writes."""
    if data.flags.writeable:
        return torch.from_numpy(data)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(data)


def scatter_blocks(
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    block_ids: list[int],
    blocks: KVBlocks,
    layout: KVLayout,
) -> None:
    """Write exported blocks into these block ids of a cache of `layout`. Everything is checked
    before the first write, so a refused import leaves the cache as it was."""
    blocks.layout.check_matches(layout)
    data = blocks.data
    expected = (len(block_ids), layout.num_layers, 2, layout.block_bytes)
    if len(block_ids) != data.shape[0]:
        raise ValueError(f"{len(block_ids)} block ids given for {data.shape[0]} exported blocks")
    if data.dtype != np.uint8 or data.shape != expected:
        raise ValueError(f"exported KV data must be uint8 {expected}, got {data.dtype} {data.shape}")
    if not block_ids:
        return
    if len(set(block_ids)) != len(block_ids):
        raise ValueError("block ids must be distinct")  # else which copy lands is undefined
    _check_block_ids(kv_caches, block_ids)
    device = kv_caches[0][0].device
    if device.type == "cpu":
        # As in gather_blocks; and torch's CPU index_copy_ moves uint8 rows element by element
        # (~0.5 GB/s against numpy's ~7).
        ids = np.asarray(block_ids, dtype=np.int64)
        for layer, (k, v) in enumerate(kv_caches):
            _byte_rows(k).numpy()[ids] = data[:, layer, 0]
            _byte_rows(v).numpy()[ids] = data[:, layer, 1]
        return
    src = _as_tensor(data).to(device)  # one host-to-device copy
    idx = torch.tensor(block_ids, dtype=torch.long, device=device)
    for layer, (k, v) in enumerate(kv_caches):
        _byte_rows(k).index_copy_(0, idx, src[:, layer, 0])
        _byte_rows(v).index_copy_(0, idx, src[:, layer, 1])
