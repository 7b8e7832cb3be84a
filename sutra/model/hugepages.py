"""KV cache memory on CPU, backed by transparent huge pages where the kernel allows them.

Decode attention reads each sequence's KV blocks from all over the cache, a few KB at a time. With
4 KB pages nearly every block read misses the TLB; with 2 MB pages a scattered read of 6 KB blocks
runs ~1.3x faster (measured 21 -> 27 GB/s on a 2-core EPYC), and decode attention ~7% faster end to
end. PyTorch's CPU allocator asks for huge pages only under an environment variable, so the cache is
mapped here, advised MADV_HUGEPAGE, and handed to torch without a copy.
"""

from __future__ import annotations

import math
import mmap

import torch


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.zeros(shape), in huge pages on CPU when the platform supports them."""
    if device.type != "cpu" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buffer.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # THP compiled out or disabled: 4 KB pages, same memory
        pass
    tensor = torch.frombuffer(buffer, dtype=dtype).view(shape)  # the tensor keeps the mapping alive
    return tensor.zero_()  # touch every page now, not in the first steps that use them
