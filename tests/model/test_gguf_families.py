"""GGUF files of the Qwen2, Qwen3, Gemma 2, Gemma 3 and Phi-3 architectures, written here from tiny random
transformers models as llama.cpp's converter (convert_hf_to_gguf.py) writes them: its metadata keys and
tensor names, Qwen's and Phi-3's q/k rows unpermuted, Gemma's norm weights plus one, Phi-3's fused qkv and
gate+up tensors and LongRoPE factor tensors, the bundled model's tokenizer. Sutra reads each as the same
model as the Hugging Face directory it came from, and its greedy tokens and logprobs equal transformers'
on the original weights. Other GGUF architectures stay refused by name."""

from __future__ import annotations

import dataclasses
import math
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


def _add_bundled_tokenizer(writer: gguf.GGUFWriter) -> None:
    bundled = gguf_reader.open_gguf(default_model_path())
    for key, f in bundled.fields.items():
        if key.startswith("tokenizer."):
            value = gguf_reader.field(bundled, key)
            sub_type = f.types[1] if len(f.types) > 1 else None
            writer.add_key_value(key, value, f.types[0], sub_type)


def _close(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_gguf(path: Path, arch: str, hf_dir: Path, head_dim: int) -> Path:
    """hf_dir's weights under llama.cpp's names, its shape as GGUF metadata, the bundled tokenizer."""
    config = TINY_SHAPE
    writer = gguf.GGUFWriter(str(path), arch=arch)
    _add_bundled_tokenizer(writer)
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
    _close(writer)
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


# ---- Gemma 2, Gemma 3, Phi-3 ------------------------------------------------------------------------

WINDOW = 12  # Gemma's sliding window: shorter than the longer prompts
LONGROPE = {"type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6], "long_factor": [2.0, 3.0, 4.0, 5.0]}


def _family_config(family: str) -> tuple[Any, Any]:
    """Tiny configs in what a GGUF can say: query_pre_attn_scalar is head_dim (llama.cpp derives it so for
    all but the 27B models), Gemma 2 ties its head (the converter drops lm_head), Gemma 3 has llama.cpp's
    fixed pattern of five sliding layers to one full."""
    import transformers as tf

    shape = dict(TINY_SHAPE, initializer_range=0.2)  # peaked attention, as in test_families.py
    gemma = dict(shape, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW)
    if family == "gemma2":
        caps = dict(attn_logit_softcapping=2.0, final_logit_softcapping=3.0)  # small enough to bend
        return tf.Gemma2Config(**dict(gemma, num_hidden_layers=4), **caps), tf.Gemma2ForCausalLM
    if family == "gemma3":
        rope = {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        }
        config = tf.Gemma3TextConfig(
            **dict(gemma, num_hidden_layers=6), rope_parameters=rope, tie_word_embeddings=False
        )
        return config, tf.Gemma3ForCausalLM
    # Partial rotary (half of each head) and LongRoPE; the prompts stay within its original length.
    config = tf.Phi3Config(
        **dict(shape, max_position_embeddings=512),
        original_max_position_embeddings=128,
        partial_rotary_factor=0.5,
        rope_scaling=dict(LONGROPE),
    )
    return config, tf.Phi3ForCausalLM


def _convert(family: str, config: Any, hf_dir: Path, path: Path) -> Path:
    """hf_dir in float32 as convert_hf_to_gguf.py writes it: its keys, the gguf package's tensor name map
    (the converter's own), Gemma's norms plus one, Phi-3's LongRoPE factors as tensors."""
    writer = gguf.GGUFWriter(str(path), arch=family)
    _add_bundled_tokenizer(writer)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = config.rope_parameters
    if family.startswith("gemma"):
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_sliding_window(config.sliding_window)
    if family == "gemma2":  # and no rope.freq_base: llama.cpp's default 10000 is Gemma 2's
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    elif family == "gemma3":  # the full layers' RoPE; llama.cpp fixes the sliding layers' base at 10000
        writer.add_rope_freq_base(rope["full_attention"]["rope_theta"])
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["full_attention"]["factor"])
    elif family == "phi3":
        original = config.original_max_position_embeddings
        scale = config.max_position_embeddings / original
        writer.add_rope_scaling_orig_ctx_len(original)
        rotary = int(rope["partial_rotary_factor"] * config.hidden_size) // config.num_attention_heads
        writer.add_rope_dimension_count(rotary)
        writer.add_rope_freq_base(rope["rope_theta"])
        writer.add_sliding_window(config.sliding_window or 0)
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))
        writer.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], np.float32))
        writer.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], np.float32))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[family.upper()], config.num_hidden_layers)
    for name, w in load_file(str(hf_dir / "model.safetensors")).items():
        if name == "lm_head.weight" and family == "gemma2":
            continue
        if family.startswith("gemma") and name.endswith("norm.weight"):
            w = w + 1  # Gemma's RMSNorm scales by 1 + weight; llama.cpp's by the weight
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        writer.add_tensor(gguf_name, np.ascontiguousarray(w.numpy()))  # Phi-3: qkv and gate+up as they are
    _close(writer)
    return path


def _reference(hf_dir: Path, prompts: list[list[int]]) -> list[tuple[list[int], torch.Tensor]]:
    """transformers' greedy tokens for each prompt and their log-probabilities."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    reference = []
    for prompt in prompts:
        out = model.generate(
            torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            eos_token_id=None,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
        tokens = out.sequences[0, len(prompt) :].tolist()
        steps = zip(out.logits, tokens, strict=True)
        reference.append((tokens, torch.stack([torch.log_softmax(s[0].float(), -1)[t] for s, t in steps])))
    return reference


def _assert_same_arch(got: Any, want: Any) -> None:
    """Equal but for the name, and LongRoPE's attention factor, which the file holds in float32."""
    got, want = dataclasses.asdict(got), dataclasses.asdict(want)
    got.pop("name"), want.pop("name")
    if want["rope_scaling"] and "attention_factor" in want["rope_scaling"]:
        factor = got["rope_scaling"].pop("attention_factor")
        assert factor == pytest.approx(want["rope_scaling"].pop("attention_factor"), rel=1e-6)
    assert got == want


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "phi3"])
def test_family_gguf_matches_hf(
    family: str, smollm2_hf_tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpu_kernels()  # built (or found) in the usual cache before the conversion cache moves below
    monkeypatch.setenv("SUTRA_CACHE_DIR", str(tmp_path / "cache"))
    config, model_cls = _family_config(family)
    hf_dir = _save_tiny(model_cls, config, smollm2_hf_tokenizer, tmp_path / "hf")
    path = _convert(family, config, hf_dir, tmp_path / f"tiny-{family}.gguf")

    loaded = load_model(ModelConfig(model=str(path)))
    source = load_model(ModelConfig(model=str(hf_dir)))
    _assert_same_arch(loaded.arch, source.arch)
    assert loaded.weights is not None and source.weights is not None
    assert loaded.weights.keys() == source.weights.keys()
    offset = source.arch.norm_weight_offset  # Gemma's norms compared as the model uses them
    for name, want in source.weights.items():
        shift = offset if name.endswith("norm.weight") else 0.0
        assert torch.equal(loaded.weights[name] + shift, want + shift), name

    rng = random.Random(2)
    prompts = [[rng.randrange(TINY_SHAPE["vocab_size"]) for _ in range(n)] for n in (3, 17, 40)]
    llm = LLM(str(path), dtype="float32", num_kv_blocks=128, max_num_batched_tokens=16)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for out, (tokens, logprobs) in zip(outs, _reference(hf_dir, prompts), strict=True):
        assert out.outputs[0].token_ids == tokens
        got = torch.tensor([lp.logprob for lp in out.outputs[0].logprobs])
        assert torch.allclose(got, logprobs, atol=1e-3), (got, logprobs)


def _metadata_only(path: Path, arch: str, layers: int, **keys: Any) -> Any:
    """A GGUF with a shape and the given `<arch>.` keys but no layers: enough for read_arch."""
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_block_count(layers)
    writer.add_embedding_length(4608)
    writer.add_feed_forward_length(64)
    writer.add_head_count(32)
    writer.add_head_count_kv(16)
    writer.add_key_length(128)
    for key, value in keys.items():
        if isinstance(value, list):
            writer.add_array(f"{arch}.{key}", value)
        else:
            (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(f"{arch}.{key}", value)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4608), np.float32))
    _close(writer)
    return gguf_reader.read_arch(gguf_reader.open_gguf(path), path)


def test_what_llama_cpp_derives_from_a_gemma_file(tmp_path: Path) -> None:
    # The 27B models (by layer count, as llama.cpp tells them) scale attention by hidden_size / heads.
    gemma2_27b = _metadata_only(tmp_path / "a.gguf", "gemma2", 46, **{"attention.sliding_window": 4096})
    assert gemma2_27b.query_pre_attn_scalar == 4608 / 32 and gemma2_27b.attn_logit_softcap == 50.0
    assert gemma2_27b.layer_types[:3] == ["sliding_attention", "full_attention", "sliding_attention"]
    other = _metadata_only(tmp_path / "b.gguf", "gemma3", 8, **{"attention.sliding_window": 512})
    assert other.query_pre_attn_scalar == 128 and other.final_logit_softcap is None
    assert other.layer_types == ["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"] * 2
    assert other.rope_local_theta == 10000.0
    # Newer files may spell the pattern and the local base out.
    keys: dict[str, Any] = {"attention.sliding_window": 512, "rope.freq_base_swa": 5e4}
    keys["attention.sliding_window_pattern"] = [True, False] * 4
    spelled = _metadata_only(tmp_path / "c.gguf", "gemma3", 8, **keys)
    assert spelled.layer_types == ["sliding_attention", "full_attention"] * 4
    assert spelled.rope_local_theta == 5e4
    no_window = _metadata_only(tmp_path / "d.gguf", "gemma3", 8)
    assert no_window.sliding_window is None and not any(no_window.is_sliding(i) for i in range(8))


@pytest.mark.parametrize("arch", ["gemma", "phi2"])
def test_other_architectures_are_refused_by_name(
    arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SUTRA_CACHE_DIR", str(tmp_path / "cache"))
    writer = gguf.GGUFWriter(str(tmp_path / f"{arch}.gguf"), arch=arch)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    _close(writer)
    with pytest.raises(
        ModelLoadError, match=f"'{arch}'.*supported: llama, qwen2, qwen3, gemma2, gemma3, phi3"
    ):
        load_model(ModelConfig(model=str(tmp_path / f"{arch}.gguf")))


def test_partial_rotary_is_refused_where_the_architecture_has_none(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="partial rotary"):
        _metadata_only(tmp_path / "q.gguf", "qwen2", 2, **{"rope.dimension_count": 64})
