"""Linear layers: the small-batch bf16 kernel and oneDNN's path against an fp32 product."""

from __future__ import annotations

import pytest
import torch

from sutra.model.linear import SMALL_BATCH, Linear, small_batch_kernels


@pytest.mark.parametrize(
    "out_features,in_features,bias", [(960, 576, True), (576, 1536, False), (48, 64, True)]
)
def test_small_batch_kernel_matches_fp32_product(out_features, in_features, bias):
    torch.manual_seed(0)
    weight = (torch.randn(out_features, in_features) * 0.05).bfloat16()
    b = torch.randn(out_features).bfloat16() if bias else None
    if small_batch_kernels(weight) is None:
        pytest.skip("the small-batch kernel needs the C++ kernels on a CPU with AVX512-BF16")
    linear = Linear(weight, b, small_batch=True)
    assert linear.small_weight is not None
    for rows in range(1, SMALL_BATCH + 2):  # the last size goes to the large-batch path
        x = torch.randn(rows, in_features).bfloat16()
        expected = x.float() @ weight.float().T + (b.float() if bias else 0)
        out = linear(x)
        assert out.shape == (rows, out_features) and out.dtype == torch.bfloat16
        # bf16 output of an fp32 sum: within one bf16 rounding of the exact product.
        torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)


def test_shapes_the_kernel_cannot_tile_use_the_general_path():
    weight = torch.randn(20, 64).bfloat16()  # 20 outputs: not a whole number of 16-output tiles
    linear = Linear(weight, small_batch=True)
    assert linear.small_weight is None
    x = torch.randn(2, 64).bfloat16()
    torch.testing.assert_close(linear(x).float(), x.float() @ weight.float().T, rtol=1e-2, atol=1e-2)
