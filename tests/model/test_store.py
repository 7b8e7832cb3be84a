"""Sutra's checkpoint format: conversion from every source, bit-identical weights, the stored layout,
the same greedy tokens (and transformers' for the bundled model), and damaged files rejected by name."""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from sutra import LLM, SamplingParams
from sutra.cli import main as cli_main
from sutra.config import ModelConfig
from sutra.errors import ModelLoadError
from sutra.model.fingerprint import model_fingerprint
from sutra.model.llama import LlamaModel, cat_rows, random_weights
from sutra.model.loader import load_model
from sutra.model.presets import get_preset
from sutra.model.store.convert import convert
from sutra.model.store.format import (
    GROUP_ALIGN,
    HEADER_BYTES,
    INDEX_FILE,
    TENSOR_ALIGN,
    is_store,
    read_index,
)
from sutra.model.store.load import StoreWeights, check_store, open_store
from sutra.model.store.writer import write_store

CHAT = [{"role": "user", "content": "What is the capital of Japan?"}]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llama_store(tiny_llama_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stores") / "tiny-llama"
    convert(str(tiny_llama_hf_dir), out, dtype="float32")
    return out


def _copy_store(store: Path, tmp_path: Path) -> Path:
    copy = tmp_path / store.name
    copy.mkdir()
    for item in store.iterdir():
        if item.is_dir():
            (copy / item.name).mkdir()
            for f in item.iterdir():
                (copy / item.name / f.name).write_bytes(f.read_bytes())
        else:
            (copy / item.name).write_bytes(item.read_bytes())
    return copy


def _hf_weights(directory: Path, tied: bool) -> dict[str, torch.Tensor]:
    saved = load_file(str(directory / "model.safetensors"))
    if tied:
        saved.pop("lm_head.weight", None)
    return saved


# ---- round trips ----------------------------------------------------------------------------------------


def test_hf_dir_round_trip_is_bit_identical(
    llama_store: Path, tiny_llama_hf_dir: Path, smollm2_hf_tokenizer: Any
) -> None:
    loaded = load_model(ModelConfig(model=str(llama_store)))
    source = load_model(ModelConfig(model=str(tiny_llama_hf_dir)))
    assert loaded.source == f"store:{llama_store}" and isinstance(loaded.weights, StoreWeights)
    assert loaded.arch == source.arch
    saved = _hf_weights(tiny_llama_hf_dir, tied=False)
    assert loaded.weights.keys() == saved.keys()
    for name, tensor in saved.items():
        assert loaded.weights[name].dtype == tensor.dtype and torch.equal(loaded.weights[name], tensor), name
    expected = smollm2_hf_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
    assert loaded.tokenizer.apply_chat_template(CHAT) == expected
    assert loaded.tokenizer.eos_token_ids == source.tokenizer.eos_token_ids
    # The prefix cache's root: the same weights give the same fingerprint, whatever the format.
    assert model_fingerprint(loaded.arch, loaded.weights, loaded.source) == model_fingerprint(
        source.arch, source.weights, source.source
    )


def test_qwen2_biases_and_tied_embeddings(tiny_qwen2_hf_dir: Path, tmp_path: Path) -> None:
    index = convert(str(tiny_qwen2_hf_dir), tmp_path / "qwen", dtype="float32")
    names = {t.name for t in index.tensors}
    assert "model.layers.1.self_attn.qkv_proj.bias" in names and "lm_head.weight" not in names
    loaded = load_model(ModelConfig(model=str(tmp_path / "qwen")))
    saved = _hf_weights(tiny_qwen2_hf_dir, tied=True)
    assert loaded.weights is not None and loaded.weights.keys() == saved.keys()
    assert all(torch.equal(loaded.weights[n], saved[n]) for n in saved)
    assert loaded.arch.attention_bias and loaded.arch.tie_word_embeddings


def test_bf16_checkpoint_holds_the_runtime_conversion(
    tiny_llama_hf_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    index = convert(str(tiny_llama_hf_dir), tmp_path / "bf16", dtype="bfloat16")
    assert index.dtype == "bfloat16"
    arch, weights, _ = open_store(tmp_path / "bf16")
    for name, tensor in _hf_weights(tiny_llama_hf_dir, tied=False).items():
        assert weights[name].dtype == torch.bfloat16 and torch.equal(weights[name], tensor.to(torch.bfloat16))
    # Served in another dtype it still works, converted at load, and says what that costs.
    with caplog.at_level(logging.WARNING, logger="sutra.model.loader"):
        llm = LLM(str(tmp_path / "bf16"), dtype="float32", num_kv_blocks=16)
    assert "holds bfloat16 weights but the engine runs torch.float32" in caplog.text
    assert llm.engine.runner.model.layers[0].qkv.weight.dtype == torch.float32


def test_random_preset_converts_to_the_engines_own_weights(tmp_path: Path) -> None:
    convert("random:tiny-llama", tmp_path / "rand", dtype="float32", seed=3)
    arch, weights, tokenizer = open_store(tmp_path / "rand")
    expected = random_weights(get_preset("tiny-llama"), torch.Generator().manual_seed(3))
    assert weights.keys() == expected.keys() and all(torch.equal(weights[n], expected[n]) for n in expected)
    assert tokenizer.vocab_size <= arch.vocab_size
    prompt = tokenizer.encode("Once upon a time")
    before = LLM("random:tiny-llama", dtype="float32", seed=3, num_kv_blocks=64)
    after = LLM(str(tmp_path / "rand"), dtype="float32", num_kv_blocks=64)
    out_before = before.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0]
    out_after = after.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0]
    assert out_after.token_ids == out_before.token_ids and out_after.text == out_before.text
    assert after.engine.max_model_len == before.engine.max_model_len


def test_layout_is_fused_aligned_and_loads_without_copies(llama_store: Path, tiny_llama_hf_dir: Path) -> None:
    index = read_index(llama_store)
    assert [g.name for g in index.groups] == ["embed", "layer.0", "layer.1", "head"]
    qkv = next(t for t in index.tensors if t.name == "model.layers.0.self_attn.qkv_proj.weight")
    q, kv = 4 * 16, 2 * 16
    assert qkv.shape == (q + 2 * kv, 64)
    assert [rows for _, rows in qkv.parts] == [q, kv, kv]
    assert all(g.offset % GROUP_ALIGN == 0 and g.nbytes % GROUP_ALIGN == 0 for g in index.groups)
    assert all(t.offset % TENSOR_ALIGN == 0 for t in index.tensors)
    assert all(p.nbytes % GROUP_ALIGN == 0 for p in index.partitions)
    assert index.partitions[0].nbytes == (llama_store / "data-00000.bin").stat().st_size
    # The model's fusion finds q|k|v and gate|up back to back: a view on the read buffer, no copy.
    arch, weights, _ = open_store(llama_store)
    model = LlamaModel(arch, weights, torch.float32, torch.device("cpu"), 64)
    layer = model.layers[0]
    q_proj = weights["model.layers.0.self_attn.q_proj.weight"]
    assert layer.qkv.weight.data_ptr() == q_proj.data_ptr()
    assert layer.qkv.weight.untyped_storage().data_ptr() == q_proj.untyped_storage().data_ptr()
    saved = _hf_weights(tiny_llama_hf_dir, tied=False)
    p = "model.layers.0."
    assert torch.equal(layer.qkv.weight, torch.cat([saved[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]))
    gate_up = torch.cat([saved[p + "mlp.gate_proj.weight"], saved[p + "mlp.up_proj.weight"]])
    assert torch.equal(layer.gate_up.weight, gate_up)
    assert layer.gate_up.weight.data_ptr() == weights[p + "mlp.gate_proj.weight"].data_ptr()


def test_many_partitions_and_chunks(tiny_qwen2_hf_dir: Path, tmp_path: Path) -> None:
    loaded = load_model(ModelConfig(model=str(tiny_qwen2_hf_dir)))
    assert loaded.weights is not None
    index = write_store(
        tmp_path / "parts",
        loaded.arch,
        dict(loaded.weights),
        loaded.tokenizer,
        torch.float32,
        "test",
        chunk_bytes=3 * GROUP_ALIGN,
        partition_max_bytes=64 << 10,
    )
    assert len(index.partitions) >= 3 and max(len(g.checksums) for g in index.groups) > 100
    assert check_store(tmp_path / "parts").verified
    _, weights, _ = open_store(tmp_path / "parts", threads=3)
    assert all(torch.equal(weights[n], loaded.weights[n]) for n in loaded.weights)


def test_cat_rows_is_a_view_only_for_parts_back_to_back() -> None:
    base = torch.arange(24.0).view(6, 4)
    fused = cat_rows([base[:1], base[1:4], base[4:]])
    assert torch.equal(fused, base) and fused.data_ptr() == base.data_ptr()
    gap = cat_rows([base[:1], base[2:4]])
    assert torch.equal(gap, torch.cat([base[:1], base[2:4]])) and gap.data_ptr() != base.data_ptr()
    apart = [torch.ones(2, 4), torch.zeros(3, 4)]
    assert torch.equal(cat_rows(apart), torch.cat(apart))
    vectors = torch.arange(10.0)
    assert cat_rows([vectors[:4], vectors[4:]]).data_ptr() == vectors.data_ptr()


def test_model_builds_the_same_whatever_order_its_weights_come_in() -> None:
    arch = get_preset("tiny-qwen2")
    weights = random_weights(arch, torch.Generator().manual_seed(0))
    names = list(weights)
    random.Random(0).shuffle(names)
    ordered = LlamaModel(arch, dict(weights), torch.float32, torch.device("cpu"), 64)
    shuffled = LlamaModel(arch, {n: weights[n] for n in names}, torch.float32, torch.device("cpu"), 64)
    for a, b in zip(ordered.layers, shuffled.layers, strict=True):
        for attr in ("qkv", "o", "gate_up", "down"):
            assert torch.equal(getattr(a, attr).weight, getattr(b, attr).weight)
        assert torch.equal(a.qkv.bias, b.qkv.bias) and torch.equal(a.input_norm, b.input_norm)


# ---- the bundled model ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_bundled_model_greedy_is_unchanged_and_equals_transformers(tmp_path: Path) -> None:
    from tests.engine.reference import hf_greedy, hf_model

    convert("default", tmp_path / "smollm2", dtype="float32")
    before = LLM(dtype="float32", num_kv_blocks=256)
    after = LLM(str(tmp_path / "smollm2"), dtype="float32", num_kv_blocks=256)
    tok = after.tokenizer
    prompts = [
        tok.apply_chat_template(CHAT),
        tok.apply_chat_template([{"role": "user", "content": "Write a haiku about the sea."}]),
    ]
    outs_before = before.generate(prompts, GREEDY, use_tqdm=False)
    outs_after = after.generate(prompts, GREEDY, use_tqdm=False)
    reference = hf_model()
    for prompt, b, a in zip(prompts, outs_before, outs_after, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].text == b.outputs[0].text
        assert a.outputs[0].token_ids == hf_greedy(reference, prompt, GREEDY.max_tokens)[0]
    assert after.engine.max_model_len == before.engine.max_model_len
    assert after.engine.kv.hash_root == before.engine.kv.hash_root  # the same prefix-cache keys
    assert tok.apply_chat_template(CHAT) == before.tokenizer.apply_chat_template(CHAT)


# ---- damaged checkpoints ----------------------------------------------------------------------------------


def test_truncated_partition_is_rejected_naming_the_file(llama_store: Path, tmp_path: Path) -> None:
    store = _copy_store(llama_store, tmp_path)
    part = store / "data-00000.bin"
    os.truncate(part, part.stat().st_size - 4096)
    with pytest.raises(ModelLoadError, match=r"data-00000\.bin is \d+ bytes .*truncated"):
        load_model(ModelConfig(model=str(store)))


def test_corrupted_bytes_fail_their_checksum_when_verified(
    llama_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _copy_store(llama_store, tmp_path)
    index = read_index(store)
    layer = index.groups[1]
    with open(store / "data-00000.bin", "r+b") as f:
        f.seek(layer.offset + 100)
        byte = f.read(1)
        f.seek(layer.offset + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(
        ModelLoadError, match=r"data-00000\.bin: bytes \d+\.\.\d+ \(group 'layer\.0'\).*checksum"
    ):
        check_store(store)
    with pytest.raises(SystemExit, match=r"data-00000\.bin.*checksum"):
        cli_main(["convert", str(store), "--check"])
    monkeypatch.setenv("SUTRA_VERIFY_CHECKPOINT", "1")
    with pytest.raises(ModelLoadError, match="checksum"):
        LLM(str(store), dtype="float32", num_kv_blocks=16)
    # Without verification a flipped byte inside the weights is not seen: hashing every byte at every
    # start would cost as much as reading them (format.py); sizes and headers are always checked.
    monkeypatch.delenv("SUTRA_VERIFY_CHECKPOINT")
    _, weights, _ = open_store(store)
    weights.wait_all()


def test_damaged_header_or_another_checkpoints_partition(
    tiny_llama_hf_dir: Path, llama_store: Path, tmp_path: Path
) -> None:
    store = _copy_store(llama_store, tmp_path)
    with open(store / "data-00000.bin", "r+b") as f:
        f.write(b"GARBAGE!")
    with pytest.raises(ModelLoadError, match=r"data-00000\.bin has a damaged header"):
        load_model(ModelConfig(model=str(store)))
    other = tmp_path / "other"
    convert(str(tiny_llama_hf_dir), other, dtype="float32")  # the same bytes, another checkpoint id
    (store / "data-00000.bin").write_bytes((other / "data-00000.bin").read_bytes())
    with pytest.raises(ModelLoadError, match=r"data-00000\.bin .*belongs to another checkpoint"):
        open_store(store)


def test_missing_partition_tokenizer_or_index(llama_store: Path, tmp_path: Path) -> None:
    store = _copy_store(llama_store, tmp_path)
    (store / "data-00000.bin").rename(tmp_path / "moved.bin")
    with pytest.raises(ModelLoadError, match=r"data-00000\.bin is missing"):
        open_store(store)
    (tmp_path / "moved.bin").rename(store / "data-00000.bin")
    (store / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="tokenizer is missing or damaged"):
        open_store(store)
    (store / INDEX_FILE).unlink()
    assert not is_store(store)
    with pytest.raises(ModelLoadError, match="no config.json"):  # then it is just a folder
        load_model(ModelConfig(model=str(store)))


def test_damaged_or_newer_index(llama_store: Path, tmp_path: Path) -> None:
    store = _copy_store(llama_store, tmp_path)
    text = (store / INDEX_FILE).read_text()
    (store / INDEX_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(ModelLoadError, match=r"index\.json is not readable JSON"):
        load_model(ModelConfig(model=str(store)))
    doc = json.loads(text)
    (store / INDEX_FILE).write_text(json.dumps({**doc, "version": 99}))
    with pytest.raises(ModelLoadError, match=r"index\.json: format version 99"):
        load_model(ModelConfig(model=str(store)))
    doc["tensors"]["model.norm.weight"]["offset"] += 1 << 30
    (store / INDEX_FILE).write_text(json.dumps(doc))
    with pytest.raises(ModelLoadError, match=r"index\.json is inconsistent: tensor 'model\.norm\.weight'"):
        open_store(store)
    del doc["groups"]
    (store / INDEX_FILE).write_text(json.dumps(doc))
    with pytest.raises(ModelLoadError, match=r"index\.json is damaged or incomplete: KeyError"):
        open_store(store)


# ---- the command line -------------------------------------------------------------------------------------


def test_convert_command(tiny_llama_hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    cli_main(["convert", str(tiny_llama_hf_dir), str(out), "--dtype", "bfloat16", "--check"])
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "bfloat16" in printed and "every checksum matches" in printed
    assert read_index(out).dtype == "bfloat16"
    cli_main(["convert", str(out), "--check"])
    assert "every checksum matches" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="already exists"):
        cli_main(["convert", str(tiny_llama_hf_dir), str(out)])
    with pytest.raises(SystemExit, match="needs SOURCE and OUT"):
        cli_main(["convert", str(tiny_llama_hf_dir)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli"]  # no temporary folder left behind


def test_failed_conversion_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="unknown model preset"):
        convert("random:no-such-model", tmp_path / "out")
    arch = get_preset("tiny-llama")
    weights = random_weights(arch, torch.Generator().manual_seed(0))
    del weights["model.layers.1.mlp.up_proj.weight"]
    tokenizer = load_model(ModelConfig(model="random:tiny-llama")).tokenizer
    with pytest.raises(ModelLoadError, match="lacks model.layers.1.mlp.up_proj.weight"):
        write_store(tmp_path / "out", arch, weights, tokenizer, torch.float32, "test")
    assert list(tmp_path.iterdir()) == []


def test_header_bytes_are_reserved(llama_store: Path) -> None:
    raw = (llama_store / "data-00000.bin").read_bytes()[:HEADER_BYTES]
    assert raw.startswith(b"SUTRACKP") and read_index(llama_store).checkpoint_id.encode() in raw
