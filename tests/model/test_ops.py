"""The fused C++ CPU ops against the plain torch ops they replace."""

from __future__ import annotations

import pytest
import torch

from sutra.model.attention import gather_kv, kv_cache_shapes
from sutra.model.cpu_kernels import cpu_kernels
from sutra.model.ops import CpuKernelOps, TorchOps
from sutra.model.rope import RotaryEmbedding

pytestmark = pytest.mark.skipif(
    cpu_kernels() is None, reason="the C++ CPU kernels could not be compiled here"
)

HEADS, KV_HEADS, DIM = 6, 2, 16
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_and_cache(dtype):
    torch.manual_seed(0)
    rope = RotaryEmbedding(DIM, 64, 10000.0, None, dtype, torch.device("cpu"))
    positions = torch.tensor([0, 5, 6, 7, 40])
    slots = torch.tensor([3, 17, 18, 19, 60])
    qkv = torch.randn(5, (HEADS + 2 * KV_HEADS) * DIM, dtype=dtype)
    results = []
    for ops in (TorchOps(), CpuKernelOps()):
        k_shape, v_shape = kv_cache_shapes(8, 8, KV_HEADS, DIM)
        caches = torch.zeros(k_shape, dtype=dtype), torch.zeros(v_shape, dtype=dtype)
        q, k, v = ops.rotary_and_cache(qkv.clone(), ops.rotary_inputs(rope, positions), *caches, slots, HEADS)
        results.append((q, k, v, *caches))
    for expected, got in zip(*results, strict=True):
        torch.testing.assert_close(got.float(), expected.float(), **TOL[dtype])
    cached_k, cached_v = gather_kv(*results[1][3:], torch.arange(8))
    torch.testing.assert_close(cached_k[slots].float(), results[1][1].float())
    torch.testing.assert_close(cached_v[slots].float(), results[1][2].float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_and_silu(dtype):
    torch.manual_seed(1)
    x, residual, weight = (
        torch.randn(7, 64, dtype=dtype),
        torch.randn(7, 64, dtype=dtype),
        torch.randn(64, dtype=dtype),
    )
    torch_h, torch_r = TorchOps.add_rms_norm(x.clone(), residual.clone(), weight, 1e-5)
    kern_h, kern_r = CpuKernelOps().add_rms_norm(x.clone(), residual.clone(), weight, 1e-5)
    torch.testing.assert_close(kern_r, torch_r, **TOL[dtype])
    torch.testing.assert_close(kern_h.float(), torch_h.float(), **TOL[dtype])
    first_h, first_r = CpuKernelOps().add_rms_norm(x.clone(), None, weight, 1e-5)
    torch.testing.assert_close(first_r, x)
    torch.testing.assert_close(
        first_h.float(), TorchOps.add_rms_norm(x, None, weight, 1e-5)[0].float(), **TOL[dtype]
    )
    gate_up = torch.randn(7, 128, dtype=dtype)
    torch.testing.assert_close(
        CpuKernelOps().silu_and_mul(gate_up).float(), TorchOps.silu_and_mul(gate_up).float(), **TOL[dtype]
    )
