from __future__ import annotations

import pytest

from sutra import LLM


@pytest.fixture(scope="session")
def llm_fp32() -> LLM:
    """The default model in float32, the dtype in which HF parity is exact."""
    return LLM(dtype="float32", num_kv_blocks=2048)


@pytest.fixture
def make_llm():
    """Extra float32 engines on the default model with other scheduler/cache settings."""

    def make(**kwargs) -> LLM:
        kwargs.setdefault("num_kv_blocks", 2048)
        return LLM(dtype="float32", **kwargs)

    return make
