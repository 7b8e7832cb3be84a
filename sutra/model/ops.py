"""Elementwise building blocks of a decoder layer, with a backend picked once per model: fused C++
kernels on CPU when they compiled, plain torch otherwise (and on CUDA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sutra.model.attention import write_kv
from sutra.model.cpu_kernels import cpu_kernels
from sutra.model.rope import RotaryEmbedding, apply_rotary

Rotary = tuple[torch.Tensor, ...]  # whatever a backend needs per step to rotate, looked up once


def gelu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """GeGLU: gelu(gate) * up with GELU's tanh approximation (Gemma's gelu_pytorch_tanh)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


class TorchOps:
    @staticmethod
    def rotary_inputs(rope: RotaryEmbedding, positions: torch.Tensor) -> Rotary:
        return rope.lookup(positions)

    @staticmethod
    def rotary_and_cache(
        qkv: torch.Tensor,
        rotary: Rotary,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        num_heads: int,
    ) -> tuple[torch.Tensor, ...]:
        """Split the fused projection, rotate q and k, store k and v in the cache: (q, k, v)."""
        num_kv_heads, head_dim = v_cache.shape[2], v_cache.shape[3]
        qk_size = (num_heads + num_kv_heads) * head_dim
        # q and k rotate together: one set of elementwise ops instead of two.
        qk = apply_rotary(qkv[:, :qk_size].view(-1, num_heads + num_kv_heads, head_dim), *rotary)
        q, k = qk[:, :num_heads], qk[:, num_heads:]
        v = qkv[:, qk_size:].view(-1, num_kv_heads, head_dim)
        write_kv(k, v, k_cache, v_cache, slot_mapping)
        return q, k, v

    @staticmethod
    def add_rms_norm(
        x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(residual + x) * weight, residual + x); without a residual x itself is the stream."""
        residual = x if residual is None else residual + x
        return F.rms_norm(residual, (x.shape[-1],), weight, eps), residual

    @staticmethod
    def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """rms_norm(x) * weight over the last dim, without a residual stream."""
        return F.rms_norm(x, (x.shape[-1],), weight, eps)

    gelu_and_mul = staticmethod(gelu_and_mul)


class CpuKernelOps:
    def __init__(self) -> None:
        self.kernels = cpu_kernels()

    @staticmethod
    def rotary_inputs(rope: RotaryEmbedding, positions: torch.Tensor) -> Rotary:
        return rope.cos, rope.sin, positions

    def rotary_and_cache(
        self,
        qkv: torch.Tensor,
        rotary: Rotary,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        num_heads: int,
    ) -> tuple[torch.Tensor, ...]:
        cos, sin, positions = rotary
        self.kernels.rotary_and_cache(qkv, cos, sin, positions, k_cache, v_cache, slot_mapping, num_heads)
        num_kv_heads, head_dim = v_cache.shape[2], v_cache.shape[3]
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        q = qkv[:, :q_size].view(-1, num_heads, head_dim)
        k = qkv[:, q_size : q_size + kv_size].view(-1, num_kv_heads, head_dim)
        v = qkv[:, q_size + kv_size :].view(-1, num_kv_heads, head_dim)
        return q, k, v

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:  # the stream starts here; x is normalized in a copy
            residual, x = x, x.clone()
            self.kernels.add_rms_norm(x, None, weight, eps)
        else:
            self.kernels.add_rms_norm(x, residual, weight, eps)  # both in place
        return x, residual

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.kernels.silu_and_mul(gate_up)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x [rows, dim] normalized in place (a copy first unless contiguous), as add_rms_norm without a
        residual: each row alone, so the batch-invariant mode can use it."""
        x = x.contiguous()
        self.kernels.add_rms_norm(x, None, weight, eps)
        return x

    gelu_and_mul = staticmethod(gelu_and_mul)  # elementwise in torch: no kernel of its own


def select_ops(device: torch.device) -> TorchOps | CpuKernelOps:
    return CpuKernelOps() if device.type == "cpu" and cpu_kernels() is not None else TorchOps()
