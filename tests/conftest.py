"""Fixtures shared across test files: the bundled model's transformers tokenizer and tiny random HF model dirs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from sutra.model.loader import default_model_path

TINY_SHAPE = dict(
    vocab_size=49152,  # the SmolLM2 tokenizer's, so every id decodes
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA
    max_position_embeddings=2048,
    bos_token_id=1,
    eos_token_id=2,
)


@pytest.fixture(scope="session")
def smollm2_hf_tokenizer() -> Any:
    """transformers' own tokenizer for the bundled GGUF (the reference ours must match); ~6 s to build."""
    from transformers import AutoTokenizer

    path = Path(default_model_path())
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _save_tiny(model_cls: Any, config: Any, tokenizer: Any, path: Path) -> Path:
    torch.manual_seed(0)
    model = model_cls(config)
    with torch.no_grad():  # transformers inits norms to 1 and biases to 0; make every tensor distinct
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(1.0, 0.1)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.02)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_llama_hf_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_hf_tokenizer: Any) -> Path:
    """A tiny random LlamaForCausalLM (GQA, untied lm_head) + the SmolLM2 tokenizer, saved by transformers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**TINY_SHAPE, tie_word_embeddings=False, rope_theta=10000.0)
    return _save_tiny(LlamaForCausalLM, config, smollm2_hf_tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen2_hf_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_hf_tokenizer: Any) -> Path:
    """A tiny random Qwen2ForCausalLM (q/k/v biases, tied embeddings) + the SmolLM2 tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**TINY_SHAPE, tie_word_embeddings=True)
    return _save_tiny(Qwen2ForCausalLM, config, smollm2_hf_tokenizer, tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def sutra_server() -> Any:
    """`sutra serve` on the default model in float32 (so greedy text can be checked against transformers)."""
    from tests.server_process import run_server

    with run_server("--dtype", "float32", "--num-kv-blocks", "512") as server:
        yield server
