"""The offline API takes the prompts vLLM's does: text, token ids, {"prompt": ...} and
{"prompt_token_ids": [...]} (with cache_salt), and logit_bias, as the server's routes do. On a tiny
random model: the forms must agree with each other, whatever the weights."""

from __future__ import annotations

import pytest

from sutra import LLM, InvalidRequestError, SamplingParams

TEXT = "The capital of Japan is"
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_llama_hf_dir) -> LLM:
    return LLM(str(tiny_llama_hf_dir), dtype="float32", num_kv_blocks=64)


def _tokens(llm: LLM, prompts, params: SamplingParams = GREEDY) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in llm.generate(prompts, params, use_tqdm=False)]


def test_every_prompt_form_gives_the_same_tokens(llm):
    ids = llm.tokenizer.encode(TEXT)
    forms = [
        TEXT,
        ids,
        {"prompt": TEXT},
        {"prompt_token_ids": ids},
        {"prompt_token_ids": ids, "prompt": TEXT},
    ]
    outs = llm.generate(forms, GREEDY, use_tqdm=False)
    assert len({tuple(out.outputs[0].token_ids) for out in outs}) == 1
    assert [out.prompt for out in outs] == [TEXT, None, TEXT, None, TEXT]
    assert all(out.prompt_token_ids == ids for out in outs)
    # One prompt alone, in any form, is a batch of one.
    assert (
        _tokens(llm, {"prompt_token_ids": ids})
        == _tokens(llm, {"prompt": TEXT})
        == [outs[0].outputs[0].token_ids]
    )


def test_cache_salt_in_a_prompt_dict_separates_prefix_caches(llm):
    long = "Salted prefix caching, offline. " * 8  # several full 16-token blocks

    def cached(prompt) -> int:
        return llm.generate(prompt, SamplingParams(max_tokens=1), use_tqdm=False)[0].metrics.num_cached_tokens

    assert cached({"prompt": long, "cache_salt": "a"}) == 0
    assert cached({"prompt": long, "cache_salt": "a"}) >= 16
    assert cached({"prompt_token_ids": llm.tokenizer.encode(long), "cache_salt": "b"}) == 0


@pytest.mark.parametrize(
    ("prompt", "param", "contains"),
    [
        ({"prompt": TEXT, "multi_modal_data": {}}, "multi_modal_data", "prompt key 'multi_modal_data'"),
        ({"prompt_token_ids": "12"}, "prompt_token_ids", "list of integer token ids"),
        ({"prompt_token_ids": [1, 2.5]}, "prompt_token_ids", "list of integer token ids"),
        ({}, "prompt_token_ids", "needs 'prompt' (text) or 'prompt_token_ids'"),
        ({"prompt": 5}, "prompt", "must be a string"),
        ({"prompt": TEXT, "cache_salt": ""}, "cache_salt", "non-empty string"),
        ({"prompt_token_ids": [99999999]}, "prompt", "outside the vocabulary"),
        ({"prompt_token_ids": []}, "prompt", "the prompt is empty"),
        (3.5, "prompt", "got float"),
    ],
)
def test_bad_prompts_raise_naming_the_key_and_queue_nothing(llm, prompt, param, contains):
    with pytest.raises(InvalidRequestError) as e:
        llm.generate([TEXT, prompt], GREEDY, use_tqdm=False)  # the good one is not queued either
    assert e.value.param == param and contains in str(e.value)
    assert not llm.engine.has_unfinished_requests()


def test_logit_bias_offline(llm):
    forced = _tokens(llm, TEXT, SamplingParams(temperature=0.0, max_tokens=4, logit_bias={7: 100}))
    assert forced == [[7, 7, 7, 7]]
    greedy = _tokens(llm, TEXT)[0][0]
    banned = SamplingParams(temperature=0.0, max_tokens=1, logit_bias={greedy: -100})
    assert _tokens(llm, TEXT, banned)[0][0] != greedy
    with pytest.raises(InvalidRequestError, match=r"token id 49152 is outside the vocabulary") as e:
        llm.generate(TEXT, SamplingParams(logit_bias={49152: 1}), use_tqdm=False)
    assert e.value.param == "logit_bias"
    assert not llm.engine.has_unfinished_requests()
