"""Linear layers with a backend chosen once at load time.

On CPUs with native bf16, oneDNN's prepacked weights (the blocked layout its kernels read) make a bf16
GEMV ~1.4x faster than F.linear on the same weights, with identical results; elsewhere F.linear.
With AVX512-BF16, batches of at most SMALL_BATCH rows (decode of a few sequences) go to a C++ kernel
that streams a second, tiled copy of the weight at close to memory bandwidth, 2-3x oneDNN's GEMV.
The second copy doubles the weights' memory, so models only get it below SMALL_BATCH_MAX_BYTES.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from sutra.model.cpu_kernels import cpu_kernels

SMALL_BATCH = 8  # the kernel's kMaxRows
SMALL_BATCH_MAX_BYTES = 2 << 30


def _packed_supported(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def small_batch_kernels(weight: torch.Tensor) -> ModuleType | None:
    """The C++ kernels if they can run this weight's small batches."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16:
        return None
    kernels = cpu_kernels()
    if kernels is None or not kernels.small_batch_linear_supports(*weight.shape):
        return None
    return kernels


class Linear:
    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, small_batch: bool = False
    ) -> None:
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.small_kernels = small_batch_kernels(weight) if small_batch else None
        self.small_weight = self.small_kernels.pack_small_batch_weight(weight) if self.small_kernels else None
        self.packed = _packed_supported(weight)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1) if self.packed else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.small_kernels is not None and x.shape[0] <= SMALL_BATCH:
            return self.small_kernels.small_batch_linear(x, self.small_weight, self.bias)
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
