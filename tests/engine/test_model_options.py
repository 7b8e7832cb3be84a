"""Per-model options an operator sets once: a chat template in place of the model's own, and the
model's generation_config.json as the sampling defaults (vLLM's --generation-config auto|vllm)."""

from __future__ import annotations

import json
import shutil

import pytest

from sutra import LLM, SamplingParams
from sutra.errors import ModelLoadError

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
HI = [{"role": "user", "content": "hi"}]


def test_a_chat_template_given_inline_or_as_a_file_replaces_the_models(tmp_path):
    inline = LLM("random:tiny-llama", num_kv_blocks=16, chat_template=TEMPLATE)
    assert inline.tokenizer.chat_text(HI, add_generation_prompt=False) == "<user>hi"
    path = tmp_path / "template.jinja"
    path.write_text(TEMPLATE + "{% if add_generation_prompt %}<bot>{% endif %}")
    from_file = LLM("random:tiny-llama", num_kv_blocks=16, chat_template=str(path))
    assert from_file.tokenizer.chat_text(HI) == "<user>hi<bot>"
    # The bundled tokenizer object other models share keeps its own template.
    assert "<|im_start|>" in LLM("random:tiny-llama", num_kv_blocks=16).tokenizer.chat_text(HI)
    with pytest.raises(ModelLoadError, match="--chat-template"):
        LLM("random:tiny-llama", num_kv_blocks=16, chat_template=str(tmp_path / "missing.jinja"))


@pytest.fixture(scope="module")
def model_with_generation_config(tmp_path_factory, tiny_llama_hf_dir):
    model = tmp_path_factory.mktemp("gen") / "model"
    shutil.copytree(tiny_llama_hf_dir, model)
    (model / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "repetition_penalty": 1.2}))
    return str(model)


def test_the_models_generation_config_is_the_default_sampling(model_with_generation_config):
    llm = LLM(model_with_generation_config, dtype="float32", num_kv_blocks=32)
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.repetition_penalty) == (0.0, 1.2)
    prompt = "the the the the"
    unset = llm.generate(prompt)[0].outputs[0].token_ids  # no SamplingParams: the model's defaults
    greedy = llm.generate(prompt, SamplingParams(temperature=0.0, repetition_penalty=1.2, max_tokens=16))
    sampled = llm.generate(prompt, SamplingParams(seed=1, max_tokens=16))  # the engine's own default: t=1
    assert unset[:16] == greedy[0].outputs[0].token_ids
    assert greedy[0].outputs[0].token_ids != sampled[0].outputs[0].token_ids  # the default mattered


def test_generation_config_vllm_ignores_the_file(model_with_generation_config):
    llm = LLM(model_with_generation_config, dtype="float32", num_kv_blocks=32, generation_config="vllm")
    assert llm.get_default_sampling_params() == SamplingParams()
    with pytest.raises(ValueError, match="generation_config"):
        LLM("random:tiny-llama", generation_config="model")
