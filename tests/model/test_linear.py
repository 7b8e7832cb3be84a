"""Linear layers: the small-batch bf16 kernel and oneDNN's path against an fp32 product, and the
batch-invariant layer's rows bit for bit across batch sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sutra.model import linear as linear_module
from sutra.model.cpu_kernels import cpu_kernels
from sutra.model.linear import SMALL_BATCH, InvariantLinear, Linear, small_batch_kernels


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


# ---- the batch-invariant mode's linear layer ------------------------------------------------------


def _needs_kernels() -> None:
    if cpu_kernels() is None:
        pytest.skip("InvariantLinear needs the C++ CPU kernels")


def _rows_alone(linear, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([linear(x[i : i + 1]) for i in range(x.shape[0])])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize(
    "out_features,in_features,bias",
    [(960, 576, True), (576, 1536, False), (50, 70, True), (49152, 64, False)],  # (50, 70): partial tile
)
def test_invariant_linear_rows_are_bit_identical_in_any_batch(dtype, out_features, in_features, bias):
    """Every row count from 1 to 40, every position in the batch and one or all threads give each row
    the bits it gets alone; and the product is right (within one rounding to the output dtype)."""
    _needs_kernels()
    torch.manual_seed(0)
    weight = (torch.randn(out_features, in_features) * 0.05).to(dtype)
    b = torch.randn(out_features).to(dtype) if bias else None
    linear = InvariantLinear(weight, b)
    x = torch.randn(40, in_features).to(dtype)
    alone = _rows_alone(linear, x)
    assert alone.dtype == dtype and alone.shape == (40, out_features)
    expected = x.float() @ weight.float().T + (b.float() if bias else 0)
    torch.testing.assert_close(alone.float(), expected, rtol=1e-2, atol=1e-2)
    for rows in range(1, 41):
        assert torch.equal(linear(x[:rows]), alone[:rows]), f"{rows} rows"
    mates = torch.randn(7, in_features).to(dtype)
    assert torch.equal(linear(torch.cat([mates, x]))[7:], alone)  # rows at other offsets
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(linear(x), alone)
    finally:
        torch.set_num_threads(threads)


def test_default_linear_is_not_batch_invariant():
    """What InvariantLinear is for: the default layer gives some row other bits in a batch of another
    size, in fp32 (GEMV vs GEMM) or bf16 (the small-batch kernel vs oneDNN), whichever this CPU runs."""
    torch.manual_seed(0)
    differs = []
    for dtype in (torch.float32, torch.bfloat16):
        weight = (torch.randn(960, 576) * 0.05).to(dtype)
        linear = Linear(weight, small_batch=True)
        x = torch.randn(40, 576).to(dtype)
        alone = _rows_alone(linear, x)
        differs += [
            (dtype, rows) for rows in (2, 4, 8, 9, 16, 40) if not torch.equal(linear(x[:rows]), alone[:rows])
        ]
    assert differs


def test_invariant_linear_without_the_kernels_is_refused(monkeypatch):
    monkeypatch.setattr(linear_module, "cpu_kernels", lambda: None)
    with pytest.raises(ValueError, match="C\\+\\+ CPU kernels"):
        InvariantLinear(torch.randn(16, 16))


@pytest.mark.parametrize("rows", [2, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_two_or_three_fp32_rows_are_padded_to_the_gemm_and_give_the_same_product(rows, bias):
    torch.manual_seed(0)
    weight, x = torch.randn(96, 64), torch.randn(rows, 64)
    b = torch.randn(96) if bias else None
    out = Linear(weight, b)(x)
    assert out.shape == (rows, 96)
    torch.testing.assert_close(out, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)
