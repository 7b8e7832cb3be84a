"""GGUF files of the Qwen2 and Qwen3 architectures, written here from tiny random transformers models as
llama.cpp's converter writes them (Qwen's q/k rows unpermuted, the bundled model's tokenizer): Sutra's
greedy tokens equal transformers' on the original weights. Gemma GGUFs stay refused by name."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sutra import LLM, SamplingParams
from sutra.config import ModelConfig
from sutra.errors import ModelLoadError
from sutra.model import gguf_reader
from sutra.model.cpu_kernels import cpu_kernels
from sutra.model.loader import default_model_path, load_model
from tests.conftest import TINY_SHAPE, _save_tiny

NEW_TOKENS = 12


def _gguf_name(name: str) -> str:
    inverse = {v: k for k, v in gguf_reader._GLOBAL_NAMES.items()}
    if name in inverse:
        return inverse[name]
    layer_inverse = {v: k for k, v in gguf_reader._LAYER_NAMES.items()}
    _, _, i, *module, kind = name.split(".")
    return f"blk.{i}.{layer_inverse['.'.join(module)]}.{kind}"


def _write_gguf(path: Path, arch: str, hf_dir: Path, head_dim: int) -> Path:
    """hf_dir's weights under llama.cpp's names, its shape as GGUF metadata, the bundled tokenizer."""
    config = TINY_SHAPE
    writer = gguf.GGUFWriter(str(path), arch=arch)
    bundled = gguf_reader.open_gguf(default_model_path())
    for key, f in bundled.fields.items():
        if key.startswith("tokenizer."):
            value = gguf_reader.field(bundled, key)
            sub_type = f.types[1] if len(f.types) > 1 else None
            writer.add_key_value(key, value, f.types[0], sub_type)
    for key, value in {
        "block_count": config["num_hidden_layers"],
        "context_length": config["max_position_embeddings"],
        "embedding_length": config["hidden_size"],
        "feed_forward_length": config["intermediate_size"],
        "attention.head_count": config["num_attention_heads"],
        "attention.head_count_kv": config["num_key_value_heads"],
        "attention.key_length": head_dim,
        "attention.value_length": head_dim,
    }.items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.rope.freq_base", 10000.0)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    weights = load_file(str(hf_dir / "model.safetensors"))
    if torch.equal(weights.get("lm_head.weight", torch.empty(0)), weights["model.embed_tokens.weight"]):
        del weights["lm_head.weight"]  # tied: llama.cpp writes no output.weight
    for name, w in weights.items():
        writer.add_tensor(_gguf_name(name), np.ascontiguousarray(w.numpy()))  # Qwen: no row permutation
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _qwen(family: str, tokenizer: Any, directory: Path) -> tuple[Path, int]:
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    shape = dict(TINY_SHAPE, initializer_range=0.2)  # peaked attention, as in test_families.py
    if family == "qwen2":
        config, head_dim = Qwen2Config(**shape, tie_word_embeddings=True), 16
        return _save_tiny(Qwen2ForCausalLM, config, tokenizer, directory), head_dim
    config = Qwen3Config(**shape, head_dim=32, tie_word_embeddings=False)
    return _save_tiny(Qwen3ForCausalLM, config, tokenizer, directory), 32


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_gguf_matches_hf(
    family: str, smollm2_hf_tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    cpu_kernels()  # built (or found) in the usual cache before the conversion cache moves below
    monkeypatch.setenv("SUTRA_CACHE_DIR", str(tmp_path / "cache"))
    hf_dir, head_dim = _qwen(family, smollm2_hf_tokenizer, tmp_path / "hf")
    path = _write_gguf(tmp_path / f"tiny-{family}.gguf", family, hf_dir, head_dim)

    loaded = load_model(ModelConfig(model=str(path)))
    source = load_model(ModelConfig(model=str(hf_dir)))
    assert loaded.arch.qk_norm == (family == "qwen3") and loaded.arch.attention_bias == (family == "qwen2")
    assert loaded.weights is not None and source.weights is not None
    assert loaded.weights.keys() == source.weights.keys()
    assert all(torch.equal(loaded.weights[n], source.weights[n]) for n in source.weights)

    rng = random.Random(2)
    prompts = [[rng.randrange(TINY_SHAPE["vocab_size"]) for _ in range(n)] for n in (3, 17, 40)]
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    llm = LLM(str(path), dtype="float32", num_kv_blocks=128, max_num_batched_tokens=16)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for prompt, out in zip(prompts, llm.generate(prompts, params, use_tqdm=False), strict=True):
        expected = model.generate(
            torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            eos_token_id=None,
            pad_token_id=0,
        )
        assert out.outputs[0].token_ids == expected[0, len(prompt) :].tolist()


def test_gemma_gguf_is_refused_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUTRA_CACHE_DIR", str(tmp_path / "cache"))
    writer = gguf.GGUFWriter(str(tmp_path / "gemma2.gguf"), arch="gemma2")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="'gemma2'.*supported: llama, qwen2, qwen3"):
        load_model(ModelConfig(model=str(tmp_path / "gemma2.gguf")))
