"""A model's identity for the prefix cache: the same weights give the same fingerprint in any process
on any machine, whatever path they were loaded from, so instances can compare cached block hashes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping

import torch

from sutra.model.arch import ModelArch

_SAMPLE_BYTES = 4096  # from each end of every tensor: cheap for any model size, and any fine-tune differs


def model_fingerprint(arch: ModelArch, weights: Mapping[str, torch.Tensor] | None, source: str) -> str:
    """sha256 of the architecture and, per tensor, its name, shape, dtype and first and last bytes.
    Random-weight models (weights None) are identified by their source (the preset) instead."""
    h = hashlib.sha256()
    shape = {k: v for k, v in dataclasses.asdict(arch).items() if k != "name"}  # name: from the path
    h.update(json.dumps(shape, sort_keys=True, default=str).encode())
    if weights is None:
        h.update(b"random|" + source.encode())
        return h.hexdigest()
    for name in sorted(weights):
        tensor = weights[name]
        h.update(f"|{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        raw = (
            tensor.detach().reshape(-1).view(torch.uint8)
            if tensor.numel()
            else torch.empty(0, dtype=torch.uint8)
        )
        h.update(raw[:_SAMPLE_BYTES].cpu().numpy().tobytes())  # a checkpoint may load onto CUDA
        h.update(raw[-_SAMPLE_BYTES:].cpu().numpy().tobytes())
    return h.hexdigest()
