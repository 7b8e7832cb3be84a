"""Rotary position embeddings (HF "rotate half" layout), with linear, Llama-3 and LongRoPE scaling."""

from __future__ import annotations

import math
from typing import Any

import torch


def inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type in (None, "default"):
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_scaling(inv_freq, scaling)
    if rope_type == "longrope":
        return _longrope_inv_freq(head_dim, theta, scaling["short_factor"])
    raise ValueError(
        f"unsupported rope_scaling type {rope_type!r} (supported: default, linear, llama3, longrope)"
    )


def _longrope_inv_freq(head_dim: int, theta: float, factors: list[float]) -> torch.Tensor:
    # transformers' arithmetic, to the bit: the factor divides before the inversion
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (torch.tensor(factors, dtype=torch.float32) * theta**exponents)


def _llama3_scaling(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _longrope_freqs(
    short: torch.Tensor, positions: torch.Tensor, head_dim: int, theta: float, s: dict[str, Any]
) -> tuple[torch.Tensor, float]:
    """LongRoPE (Phi-3): the short factors' frequencies below original_max_position_embeddings and the
    long factors' from there on, both scaled by attention_factor. Per position, so a sequence that stays
    within the original length is rotated exactly as transformers does; transformers switches a whole
    sequence to the long factors once it grows past that length, which this does not."""
    long = torch.outer(positions, _longrope_inv_freq(head_dim, theta, s["long_factor"]))
    past = positions >= s["original_max_position_embeddings"]
    return torch.where(past[:, None], long, short), float(s["attention_factor"])


class RotaryEmbedding:
    """Precomputed cos/sin tables; `lookup` is done once per step and shared by every layer."""

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: dict[str, Any] | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(positions, inverse_frequencies(head_dim, theta, scaling))
        scale = 1.0
        if scaling and scaling.get("rope_type") == "longrope":
            freqs, scale = _longrope_freqs(freqs, positions, head_dim, theta, scaling)
        self.cos = (freqs.cos() * scale).to(dtype=dtype, device=device)
        self.sin = (freqs.sin() * scale).to(dtype=dtype, device=device)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [T, 1, head_dim / 2] for broadcasting over heads."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; rotates the two halves of the head dim (HF Llama layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
