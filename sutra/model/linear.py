"""Linear layers with a backend chosen once at load time.

On CPUs with native bf16, oneDNN's prepacked weights (the blocked layout its kernels read) make a bf16
GEMV ~1.4x faster than F.linear on the same weights, with identical results; elsewhere F.linear.
With AVX512-BF16, batches of at most SMALL_BATCH rows (decode of a few sequences) go to a C++ kernel
that streams a second, tiled copy of the weight at close to memory bandwidth, 2-3x oneDNN's GEMV.
The second copy doubles the weights' memory, so models only get it below SMALL_BATCH_MAX_BYTES.

InvariantLinear (the engine's batch-invariant mode) runs every row count through one C++ kernel whose
sum for each output has one fixed order, so a row's result does not depend on its batch mates; it
keeps only its own packed copy of the weight.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from sutra.model.cpu_kernels import cpu_kernels

SMALL_BATCH = 8  # the kernel's kMaxRows
SMALL_BATCH_MAX_BYTES = 2 << 30
GEMM_MIN_ROWS = 4  # fewer fp32 rows (but more than one) are padded up to this many, see Linear
INVARIANT_TILE = 16  # outputs per tile of invariant_linear.cpp


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
        rows = x.shape[0]
        if 1 < rows < GEMM_MIN_ROWS and x.device.type == "cpu" and x.dtype == torch.float32:
            # MKL's fp32 GEMM runs 2-3 rows as one GEMV per row: padding to 4 rows takes half the
            # time (decode batches of 2-3 sequences, measured on AVX2 and the default model).
            padded = x.new_zeros(GEMM_MIN_ROWS, x.shape[1])
            padded[:rows] = x
            return F.linear(padded, self.weight, self.bias)[:rows]
        return F.linear(x, self.weight, self.bias)


def pack_invariant_weight(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [ceil(N / 16), K, 16] tiles of 16 outputs (zero-padded), in bf16 or fp32 (fp16 widens)."""
    n, k = weight.shape
    tiles = -(-n // INVARIANT_TILE)
    w = weight if weight.dtype in (torch.float32, torch.bfloat16) else weight.float()
    w = F.pad(w, (0, 0, 0, tiles * INVARIANT_TILE - n))
    return w.view(tiles, INVARIANT_TILE, k).transpose(1, 2).contiguous()


class InvariantLinear:
    """x @ W.T (+ bias) whose every row is bit-identical whatever the other rows and their number."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        kernels = cpu_kernels() if weight.device.type == "cpu" else None
        if kernels is None:
            raise ValueError(
                "batch-invariant linear layers need Sutra's C++ CPU kernels on a CPU device "
                "(a C++ compiler, and SUTRA_DISABLE_CPU_KERNELS unset)"
            )
        self.out_features, self.in_features = weight.shape
        self.kernels = kernels
        self.weight = pack_invariant_weight(weight)
        self.bias = bias.float().contiguous() if bias is not None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.invariant_linear(x, self.weight, self.out_features, self.bias)
