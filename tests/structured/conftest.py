from __future__ import annotations

import pytest

from sutra.model.loader import bundled_tokenizer
from sutra.model.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    """The default model's tokenizer (SmolLM2, 49,152 tokens), read from its converted cache."""
    return bundled_tokenizer()
