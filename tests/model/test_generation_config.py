"""A model's generation_config.json becomes its sampling defaults, and travels with its tokenizer."""

from __future__ import annotations

import json
import logging
import shutil

from sutra.model.generation_config import generation_defaults
from sutra.model.hf_dir import read_tokenizer
from sutra.model.tokenizer import Tokenizer


def test_the_sampling_keys_are_read_and_bad_values_dropped(caplog):
    config = {
        "temperature": 0.6,
        "top_p": 0.9,
        "top_k": 20,
        "min_p": 0.0,
        "repetition_penalty": 1.1,
        "do_sample": True,
        "max_new_tokens": 100,  # not a sampling default
        "eos_token_id": [1, 2],
    }
    assert generation_defaults(config) == {
        "temperature": 0.6,
        "top_p": 0.9,
        "top_k": 20,
        "min_p": 0.0,
        "repetition_penalty": 1.1,
    }
    assert generation_defaults(None) == {} and generation_defaults({}) == {}
    with caplog.at_level(logging.WARNING):
        bad = generation_defaults(
            {"temperature": -1, "top_p": 1.5, "top_k": 2.5, "min_p": "x", "repetition_penalty": True}
        )
    assert bad == {}
    assert caplog.text.count("ignoring") == 5


def test_an_hf_directory_gives_its_tokenizer_the_defaults_and_save_load_keeps_them(
    tmp_path, tiny_llama_hf_dir
):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_hf_dir, model)
    (model / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "top_k": 40}))
    config = json.loads((model / "config.json").read_text())
    tokenizer = read_tokenizer(model, config)
    assert tokenizer.generation_defaults == {"temperature": 0.7, "top_k": 40}
    saved = tmp_path / "saved"
    saved.mkdir()
    tokenizer.save(saved)
    assert Tokenizer.load(saved).generation_defaults == {"temperature": 0.7, "top_k": 40}
