"""A checkpoint read onto CUDA through the pinned staging buffers (sutra/model/store/staging.py). Needs a
CUDA device: skipped without one. The staging pipeline itself runs on CPU in test_store_reader.py
(`staged`); what only runs here is the pinned memory, the copy streams and their events."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sutra import LLM, SamplingParams
from sutra.model.store.convert import convert
from sutra.model.store.load import open_store

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_checkpoint_loads_onto_cuda_bit_identical(tmp_path: Path) -> None:
    convert("random:tiny-qwen2", tmp_path / "store", dtype="bfloat16")
    _, on_cpu, _ = open_store(tmp_path / "store", device="cpu")
    _, on_gpu, _ = open_store(tmp_path / "store", device="cuda", threads=3)
    stats = on_gpu.wait_all()
    assert stats.nbytes == on_cpu.wait_all().nbytes
    for name, tensor in on_cpu.items():
        assert on_gpu[name].device.type == "cuda" and torch.equal(on_gpu[name].cpu(), tensor), name


def test_engine_on_cuda_from_a_checkpoint(tmp_path: Path) -> None:
    convert("random:tiny-llama", tmp_path / "store", dtype="bfloat16")
    llm = LLM(str(tmp_path / "store"), device="cuda", dtype="bfloat16", num_kv_blocks=64)
    out = llm.generate([[1, 2, 3, 4]], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 8
