"""The loader on real files: the bundled GGUF (cold and cached), tiny HF dirs, tiny GGUFs, presets, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sutra.config import ModelConfig
from sutra.errors import ModelLoadError
from sutra.model import gguf_reader
from sutra.model.hf_dir import expected_shapes
from sutra.model.loader import LoadedModel, _cached, cache_entry, default_model_path, load_model
from sutra.model.presets import PRESETS, get_preset

CHAT = [{"role": "user", "content": "What is the capital of Japan?"}]


@pytest.fixture(scope="module")
def cold_and_warm(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedModel, LoadedModel, Path]:
    """The bundled model loaded into an empty cache (conversion), then again (from the cache)."""
    cache = tmp_path_factory.mktemp("sutra-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SUTRA_CACHE_DIR", str(cache))
        cold = load_model(ModelConfig())
        warm = load_model(ModelConfig())
    return cold, warm, cache


@pytest.fixture(scope="module")
def bundled(cold_and_warm: tuple[LoadedModel, LoadedModel, Path]) -> LoadedModel:
    return cold_and_warm[1]


def test_default_model_path_is_the_bundled_gguf() -> None:
    path = Path(default_model_path())
    assert path.is_absolute() and path.is_file() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_bundled_arch(bundled: LoadedModel) -> None:
    a = bundled.arch
    assert (a.num_layers, a.hidden_size, a.intermediate_size) == (30, 576, 1536)
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.vocab_size) == (9, 3, 64, 49152)
    assert a.rope_theta == 100000.0 and a.rope_scaling is None
    assert a.tie_word_embeddings and not a.attention_bias
    assert a.max_position_embeddings == 8192 and a.rms_norm_eps == pytest.approx(1e-5)
    assert a.bos_token_id == 1 and a.eos_token_ids[0] == 2
    assert bundled.source == f"gguf:{default_model_path()}"


def test_bundled_weights_are_complete_fp32(bundled: LoadedModel) -> None:
    assert bundled.weights is not None
    shapes = expected_shapes(bundled.arch)
    assert {n: tuple(w.shape) for n, w in bundled.weights.items()} == shapes
    assert all(w.dtype == torch.float32 and w.device.type == "cpu" for w in bundled.weights.values())


def test_cache_is_complete_and_reused(cold_and_warm: tuple[LoadedModel, LoadedModel, Path]) -> None:
    cold, warm, cache = cold_and_warm
    (entry,) = cache.iterdir()
    assert sorted(p.name for p in entry.iterdir()) == ["tokenizer", "weights"]  # no temporary leftovers
    assert (entry / "weights" / "model.safetensors").is_file() and (
        entry / "tokenizer" / "tokenizer.json"
    ).is_file()
    assert cold.arch == warm.arch
    assert (
        cold.weights is not None and warm.weights is not None and cold.weights.keys() == warm.weights.keys()
    )
    assert all(torch.equal(cold.weights[n], warm.weights[n]) for n in cold.weights)
    assert cold.tokenizer.apply_chat_template(CHAT) == warm.tokenizer.apply_chat_template(CHAT)
    assert cold.tokenizer.eos_token_ids == warm.tokenizer.eos_token_ids


@pytest.mark.slow
def test_bundled_weights_equal_transformers(bundled: LoadedModel) -> None:
    from transformers import AutoModelForCausalLM

    path = Path(default_model_path())
    reference = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    expected = reference.state_dict()
    assert bundled.weights is not None
    assert set(expected) == set(bundled.weights) | {"lm_head.weight"}  # tied: we omit lm_head
    for name, tensor in expected.items():
        ours = bundled.weights["model.embed_tokens.weight" if name == "lm_head.weight" else name]
        assert torch.equal(ours, tensor), name


def test_explicit_gguf_path(bundled: LoadedModel) -> None:
    loaded = load_model(ModelConfig(model=default_model_path()))
    assert loaded.arch == bundled.arch and loaded.source == bundled.source


def test_cache_key_follows_the_file(tmp_path: Path) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x")
    first = cache_entry(str(f))
    f.write_bytes(b"xy")
    assert cache_entry(str(f)) != first and first.name.startswith("m-")


# ---- the cache helper -----------------------------------------------------------------------------------


def test_cached_builds_once_then_reads(tmp_path: Path) -> None:
    builds: list[Path] = []

    def build(d: Path) -> None:
        builds.append(d)
        (d / "v.txt").write_text("42")

    def read(d: Path) -> str:
        return (d / "v.txt").read_text()

    assert _cached(tmp_path / "entry", read, build) == "42"
    assert _cached(tmp_path / "entry", read, build) == "42"
    assert len(builds) == 1 and [p.name for p in tmp_path.iterdir()] == ["entry"]


def test_cached_failed_build_leaves_nothing(tmp_path: Path) -> None:
    def build(d: Path) -> None:
        (d / "half.txt").write_text("half")
        raise ModelLoadError("boom")

    with pytest.raises(ModelLoadError, match="boom"):
        _cached(tmp_path / "model-hash" / "weights", lambda d: None, build)
    assert list(tmp_path.iterdir()) == []


def test_cached_rebuilds_a_damaged_cache(tmp_path: Path) -> None:
    (tmp_path / "entry").mkdir()  # a cache missing its file

    def build(d: Path) -> None:
        (d / "v.txt").write_text("ok")

    assert _cached(tmp_path / "entry", lambda d: (d / "v.txt").read_text(), build) == "ok"


# ---- Hugging Face directories ---------------------------------------------------------------------------


def _assert_same_weights(loaded: LoadedModel, directory: Path) -> None:
    saved = load_file(str(directory / "model.safetensors"))
    assert loaded.weights is not None
    if loaded.arch.tie_word_embeddings:
        saved.pop("lm_head.weight", None)
    assert loaded.weights.keys() == saved.keys()
    assert all(torch.equal(loaded.weights[n], saved[n]) for n in saved)


def test_hf_llama_dir(tiny_llama_hf_dir: Path, smollm2_hf_tokenizer: Any) -> None:
    loaded = load_model(ModelConfig(model=str(tiny_llama_hf_dir)))
    a = loaded.arch
    assert (a.num_layers, a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim) == (2, 64, 4, 2, 16)
    assert not a.tie_word_embeddings and not a.attention_bias and a.rope_scaling is None
    assert a.eos_token_ids[0] == 2 and loaded.source == f"hf:{tiny_llama_hf_dir}"
    assert "lm_head.weight" in (loaded.weights or {})
    _assert_same_weights(loaded, tiny_llama_hf_dir)
    expected = smollm2_hf_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
    assert loaded.tokenizer.apply_chat_template(CHAT) == expected


def test_hf_qwen2_dir_has_biases(tiny_qwen2_hf_dir: Path) -> None:
    loaded = load_model(ModelConfig(model=str(tiny_qwen2_hf_dir)))
    assert loaded.arch.attention_bias and loaded.arch.tie_word_embeddings
    assert "model.layers.1.self_attn.k_proj.bias" in (loaded.weights or {})
    _assert_same_weights(loaded, tiny_qwen2_hf_dir)


def test_hf_sharded_dir_and_llama3_rope(tiny_llama_hf_dir: Path, tmp_path: Path) -> None:
    weights = load_file(str(tiny_llama_hf_dir / "model.safetensors"))
    from safetensors.torch import save_file

    names = sorted(weights)
    shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2 :]}
    for shard, shard_names in shards.items():
        save_file({n: weights[n] for n in shard_names}, str(tmp_path / shard))
    index = {"weight_map": {n: shard for shard, ns in shards.items() for n in ns}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((tiny_llama_hf_dir / "config.json").read_text())
    config.pop("rope_parameters", None)  # the transformers 4.x spelling
    config["rope_theta"] = 500000.0
    config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tmp_path / f).write_bytes((tiny_llama_hf_dir / f).read_bytes())
    loaded = load_model(ModelConfig(model=str(tmp_path)))
    assert loaded.arch.rope_theta == 500000.0 and loaded.arch.rope_scaling == config["rope_scaling"]
    assert loaded.weights is not None and all(torch.equal(loaded.weights[n], weights[n]) for n in names)


# ---- tiny GGUF files written here -----------------------------------------------------------------------


def _hf_to_gguf_name(name: str) -> str:
    inverse = {v: k for k, v in gguf_reader._GLOBAL_NAMES.items()}
    if name in inverse:
        return inverse[name]
    layer_inverse = {v: k for k, v in gguf_reader._LAYER_NAMES.items()}
    _, _, i, *module, kind = name.split(".")
    return f"blk.{i}.{layer_inverse['.'.join(module)]}.{kind}"


def _write_gguf(path: Path, arch: str, weights: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    writer = gguf.GGUFWriter(str(path), arch=arch)
    for key, value in meta.items():
        writer.add_uint32(key, value) if isinstance(value, int) else writer.add_float32(key, value)
    for name, w in weights.items():
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tiny_gguf_unpermutes_gqa_rope_rows_and_reads_llama3_rope(
    tiny_llama_hf_dir: Path, tmp_path: Path
) -> None:
    hf = load_file(str(tiny_llama_hf_dir / "model.safetensors"))
    heads, kv_heads, theta, head_dim = 4, 2, 500000.0, 16
    tensors = {}
    for name, w in hf.items():
        a = w.numpy()
        if "q_proj" in name:
            a = gguf_reader.permute_rope_rows(a, heads)  # as llama.cpp's convert_hf_to_gguf.py does
        elif "k_proj" in name:
            a = gguf_reader.permute_rope_rows(a, kv_heads)
        tensors[_hf_to_gguf_name(name)] = np.ascontiguousarray(a)
    factors = gguf_reader.llama3_freq_factors(32.0, 1.0, 4.0, 8192, theta, head_dim)
    tensors["rope_freqs.weight"] = factors.astype(np.float32)
    meta = {"llama.block_count": 2, "llama.context_length": 2048, "llama.embedding_length": 64,
            "llama.feed_forward_length": 128, "llama.attention.head_count": heads,
            "llama.attention.head_count_kv": kv_heads, "llama.rope.freq_base": theta,
            "llama.attention.layer_norm_rms_epsilon": 1e-6}  # fmt: skip
    path = _write_gguf(tmp_path / "tiny.gguf", "llama", tensors, meta)
    reader = gguf_reader.open_gguf(path)
    arch = gguf_reader.read_arch(reader, path)
    assert (arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.vocab_size) == (4, 2, 16, 49152)
    assert not arch.tie_word_embeddings and arch.rope_scaling is not None
    assert arch.rope_scaling["rope_type"] == "llama3" and arch.rope_scaling["factor"] == 32.0
    weights = gguf_reader.read_weights(reader, arch, path)
    assert weights.keys() == hf.keys()
    assert all(torch.equal(weights[n], hf[n]) for n in hf)


# ---- errors ---------------------------------------------------------------------------------------------


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SUTRA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_missing_path() -> None:
    with pytest.raises(ModelLoadError, match="/no/such/model"):
        load_model(ModelConfig(model="/no/such/model"))


def test_gguf_with_unsupported_architecture(tmp_path: Path, tmp_cache: Path) -> None:
    path = _write_gguf(
        tmp_path / "mamba.gguf", "mamba", {"token_embd.weight": np.zeros((8, 4), np.float32)}, {}
    )
    with pytest.raises(ModelLoadError, match="'mamba'.*supported: llama"):
        load_model(ModelConfig(model=str(path)))
    assert list(tmp_cache.iterdir()) == []


def test_not_a_gguf_file(tmp_path: Path, tmp_cache: Path) -> None:
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ModelLoadError, match="bad.gguf"):
        load_model(ModelConfig(model=str(tmp_path / "bad.gguf")))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        load_model(ModelConfig(model=str(tmp_path / "weights.bin")))


def test_hf_dir_with_unsupported_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    with pytest.raises(ModelLoadError, match="'GPT2LMHeadModel'.*LlamaForCausalLM"):
        load_model(ModelConfig(model=str(tmp_path)))


def test_dir_without_a_model(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(ModelConfig(model=str(tmp_path)))


def test_hf_dir_with_wrong_weights(tiny_llama_hf_dir: Path, tmp_path: Path) -> None:
    config = json.loads((tiny_llama_hf_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    (tmp_path / "model.safetensors").symlink_to(tiny_llama_hf_dir / "model.safetensors")
    with pytest.raises(ModelLoadError, match="lacks .* weights"):
        load_model(ModelConfig(model=str(tmp_path)))


# ---- random presets -------------------------------------------------------------------------------------


def test_random_preset() -> None:
    loaded = load_model(ModelConfig(model="random:tiny-llama"))
    assert loaded.weights is None and loaded.source == "random:tiny-llama"
    a = loaded.arch
    assert a.num_heads % a.num_kv_heads == 0 and a.vocab_size >= loaded.tokenizer.vocab_size
    assert a.eos_token_ids == loaded.tokenizer.eos_token_ids and a.bos_token_id == 1


def test_llama_3_8b_preset() -> None:
    a = get_preset("llama-3-8b")
    assert (a.vocab_size, a.hidden_size, a.intermediate_size, a.num_layers) == (128256, 4096, 14336, 32)
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.rope_theta) == (32, 8, 128, 500000.0)
    assert a.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    assert not a.tie_word_embeddings and a.max_position_embeddings == 8192
    get_preset("llama-3-8b").eos_token_ids.append(5)  # callers get copies
    assert PRESETS["llama-3-8b"].eos_token_ids == []


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_consistent(name: str) -> None:
    a = get_preset(name)
    assert a.name == name and a.num_heads % a.num_kv_heads == 0 and a.head_dim % 2 == 0


def test_unknown_preset_lists_the_presets() -> None:
    with pytest.raises(ModelLoadError, match="llama-3-8b.*tiny-llama"):
        load_model(ModelConfig(model="random:gpt-5"))
