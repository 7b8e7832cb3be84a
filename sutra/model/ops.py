"""Elementwise building blocks of a decoder layer, with a backend picked once per model: fused C++
kernels on CPU when they compiled, plain torch otherwise (and on CUDA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sutra.model.cpu_kernels import cpu_kernels


class TorchOps:
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


class CpuKernelOps:
    def __init__(self) -> None:
        self.kernels = cpu_kernels()

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


def select_ops(device: torch.device) -> TorchOps | CpuKernelOps:
    return CpuKernelOps() if device.type == "cpu" and cpu_kernels() is not None else TorchOps()
