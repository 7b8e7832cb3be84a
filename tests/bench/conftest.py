"""Fixtures of the serving-benchmark tests."""

from __future__ import annotations

import pytest

from sutra.bench.tokenizer import BenchTokenizer, load_tokenizer


@pytest.fixture(scope="session")
def bundled_tokenizer() -> BenchTokenizer:
    return load_tokenizer(None)
