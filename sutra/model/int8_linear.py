"""Weight-only int8 linear layers (ModelConfig.quantization="int8").

Each output channel n of a weight W [N, K] is stored as int8 q[n] = round(W[n] / s[n]) with one fp32
scale s[n] = max|W[n]| / 127 (symmetric: no zero point), so |W - q s| <= s / 2 per channel. Weights are
quantized at load from whatever the loader produced (GGUF, HF directory, checkpoint, random preset).

Single-stream decode reads every weight once per token, so on CPU its speed is bound by the bytes of the
weights: int8 holds 4x fewer than fp32. The C++ kernel (csrc/int8_linear.cpp) widens the int8 weights to
fp32 in registers and applies each scale once to an output's sum; torch's own int8 weight matmul
(aten._weight_int8pack_mm) is 5-10x slower than an fp32 F.linear on AVX2 CPUs. Without the kernel (no
compiler, or a CUDA device) a layer dequantizes its weight and runs F.linear: the same results within fp32
rounding, the memory saved, no speed gained.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from sutra.model.cpu_kernels import int8_kernels

TILE = 16  # outputs per tile of int8_linear.cpp
QMAX = 127  # symmetric: -127..127, so -q is always representable
_QUANTIZE_ROWS = 4096  # rows quantized at a time: bounds the fp32 temporaries of a large LM head


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] (any float dtype) -> (q int8 [N, K], scale fp32 [N]) with W ~= q * scale[:, None]."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"int8 quantization takes a floating-point [N, K] weight, got {tuple(weight.shape)}")
    n, k = weight.shape
    q = torch.empty(n, k, dtype=torch.int8, device=weight.device)
    scale = torch.empty(n, dtype=torch.float32, device=weight.device)
    for start in range(0, n, _QUANTIZE_ROWS):
        w = weight[start : start + _QUANTIZE_ROWS].float()
        s = w.abs().amax(dim=1) / QMAX
        s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero channel quantizes to zeros
        q[start : start + len(w)] = torch.round(w / s[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
        scale[start : start + len(w)] = s
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale[:, None]).to(dtype)


def pack_int8_tiles(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] -> [ceil(N / 16), K, 16] tiles of 16 outputs (zero-padded), the kernel's layout."""
    n, k = q.shape
    tiles = -(-n // TILE)
    padded = torch.zeros(tiles * TILE, k, dtype=torch.int8, device=q.device)
    padded[:n] = q
    return padded.view(tiles, TILE, k).transpose(1, 2).contiguous()


def unpack_int8_tiles(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """The inverse of pack_int8_tiles: int8 [N, K]."""
    tiles, k, _ = packed.shape
    return packed.transpose(1, 2).reshape(tiles * TILE, k)[:out_features]


def int8_linear_reference(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The pure-torch path: dequantize in the activation's dtype, then F.linear."""
    return F.linear(x, dequantize_int8(q, scale, x.dtype), None if bias is None else bias.to(x.dtype))


def int8_weight_bytes(out_features: int, in_features: int) -> int:
    """What an int8 layer holds for a [N, K] weight: the int8 values and fp32 scales (the kernel's
    tiles also pad N up to a multiple of 16)."""
    return out_features * in_features + 4 * out_features


class Int8Linear:
    """x @ W.T (+ bias) with W held as per-channel int8; the call interface of Linear.

    With the C++ kernel every row is one fp32 sum per output in a fixed order whatever the number of
    rows, so results do not depend on batch mates (the engine's batch-invariant mode relies on this)."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, use_kernel: bool = True
    ) -> None:
        self.out_features, self.in_features = weight.shape
        q, self.scale = quantize_int8(weight)
        self.bias = bias
        self.kernels: ModuleType | None = (
            int8_kernels() if use_kernel and weight.device.type == "cpu" else None
        )
        # One copy of the int8 weights: the kernel's tiles, or row-major for the torch path.
        self.weight = pack_int8_tiles(q) if self.kernels is not None else q

    @property
    def uses_kernel(self) -> bool:
        return self.kernels is not None

    def int8_weight(self) -> torch.Tensor:
        """The int8 values [N, K], as quantized."""
        if self.kernels is None:
            return self.weight
        return unpack_int8_tiles(self.weight, self.out_features)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None:
            return self.kernels.int8_linear(x, self.weight, self.scale, self.bias)
        return int8_linear_reference(x, self.weight, self.scale, self.bias)
