"""Request-body mapping and server options, without a server."""

from __future__ import annotations

import argparse

import pytest

from sutra.errors import InvalidRequestError
from sutra.server.common import resolve_max_tokens
from sutra.server.launcher import add_serve_args, parse_api_keys, served_model_name
from sutra.server.limits import RequestLimits, limits_from_args
from sutra.server.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest


def test_max_tokens_defaults_to_the_room_left_and_is_checked_against_the_context():
    assert resolve_max_tokens(None, 100, 2048, "max_tokens") == 1948
    assert resolve_max_tokens(48, 2000, 2048, "max_tokens") == 48
    with pytest.raises(
        InvalidRequestError, match=r"2049 tokens \(2000 in the prompt, 49 for the completion\)"
    ) as e:
        resolve_max_tokens(49, 2000, 2048, "max_completion_tokens")
    assert e.value.param == "max_completion_tokens"


def test_sampling_fields_map_to_sampling_params():
    body = CompletionRequest(prompt="hi", temperature=0.5, top_k=4, stop="END", seed=3, n=2, ignore_eos=True)
    params = body.sampling_params(max_tokens=7, logprobs=body.logprobs)
    assert (params.temperature, params.top_k, params.stop, params.seed, params.n) == (0.5, 4, ["END"], 3, 2)
    assert params.max_tokens == 7 and params.ignore_eos and params.logprobs is None
    assert params.top_p == 1.0  # unset fields keep the engine's defaults
    with pytest.raises(InvalidRequestError) as e:
        CompletionRequest(prompt="hi", top_p=0).sampling_params(4, None)
    assert e.value.param == "top_p"


def test_prompt_shapes():
    assert CompletionRequest(prompt="a").prompts() == ["a"]
    assert CompletionRequest(prompt=[1, 2]).prompts() == [[1, 2]]
    assert CompletionRequest(prompt=["a", "b"]).prompts() == ["a", "b"]
    assert CompletionRequest(prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]
    with pytest.raises(InvalidRequestError, match="empty"):
        CompletionRequest(prompt=[]).prompts()


def test_chat_messages_and_logprob_options():
    parts = ChatMessage(
        role="developer", content=[{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]
    )
    assert parts.template_dict() == {"role": "system", "content": "be brief"}
    with pytest.raises(InvalidRequestError, match="image_url"):
        ChatMessage(role="user", content=[{"type": "image_url", "image_url": {}}]).template_dict()
    body = ChatCompletionRequest(
        messages=[{"role": "user", "content": "x"}],
        logprobs=True,
        top_logprobs=3,
        max_tokens=5,
        max_completion_tokens=9,
    )
    assert body.num_logprobs == 3 and body.requested_max_tokens == 9
    assert ChatCompletionRequest(messages=[{"role": "user", "content": "x"}]).num_logprobs is None


def test_api_keys_and_model_names():
    assert parse_api_keys(["alice:sk-1", "sk-2"]) == {"sk-1": "alice", "sk-2": "key2"}
    with pytest.raises(SystemExit, match="TENANT:KEY"):
        parse_api_keys(["alice:"])
    assert served_model_name(None, None) == "SmolLM2-135M-Instruct"
    assert served_model_name("/m/llama.Q4.gguf", None) == "llama.Q4"
    assert served_model_name("/models/Qwen2-0.5B/", None) == "Qwen2-0.5B"
    assert served_model_name("random:tiny-llama", "mine") == "mine"


def test_limit_flags_build_request_limits():
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    assert limits_from_args(parser.parse_args([])) == RequestLimits()
    args = parser.parse_args(["--max-n", "4", "--max-stop-strings", "2", "--max-body-bytes", "1024"])
    limits = limits_from_args(args)
    assert (limits.max_n, limits.max_stop_strings, limits.max_body_bytes) == (4, 2, 1024)
    with pytest.raises(SystemExit, match="--max-stop-strings must be a positive integer"):
        limits_from_args(parser.parse_args(["--max-stop-strings", "0"]))
    with pytest.raises(SystemExit, match="--max-n must be at most 128"):
        limits_from_args(parser.parse_args(["--max-n", "129"]))


def test_limits_name_the_field_and_the_limit():
    limits = RequestLimits(max_stop_strings=1, max_prompts_per_batch=2, max_chat_messages=1)
    with pytest.raises(InvalidRequestError, match=r"stop: at most 1 stop strings are allowed, got 2") as e:
        limits.check_completion(CompletionRequest(prompt="hi", stop=["a", "b"]))
    assert e.value.param == "stop"
    limits.check_completion(CompletionRequest(prompt=[1, 2, 3]))  # one prompt of token ids
    with pytest.raises(InvalidRequestError, match="at most 2 prompts") as e:
        limits.check_completion(CompletionRequest(prompt=[[1], [2], [3]]))
    assert e.value.param == "prompt"
    two = [{"role": "user", "content": "x"}] * 2
    with pytest.raises(InvalidRequestError, match="at most 1 messages") as e:
        limits.check_chat(ChatCompletionRequest(messages=two))
    assert e.value.param == "messages"


def test_lone_surrogates_are_found_with_their_path():
    ok = ChatCompletionRequest(messages=[{"role": "user", "content": "日本 🦙"}], stop=["é"])
    ok.check_text()
    bad = ChatCompletionRequest(
        messages=[
            {"role": "user", "content": "x"},
            {"role": "user", "content": [{"type": "text", "text": "\ud800"}]},
        ]
    )
    with pytest.raises(InvalidRequestError, match="lone UTF-16 surrogate") as e:
        bad.check_text()
    assert e.value.param == "messages.1.content.0.text"
    with pytest.raises(InvalidRequestError) as e:
        CompletionRequest(prompt=["a", "b\udfff"]).check_text()
    assert e.value.param == "prompt.1"


def test_unsupported_fields_are_refused_by_name():
    for field in ("bad_words", "guided_decoding_backend", "guided_whitespace_pattern"):
        with pytest.raises(InvalidRequestError, match=f"{field} is not supported") as e:
            CompletionRequest(prompt="hi", **{field: 1}).check_supported()
        assert e.value.param == field
    with pytest.raises(InvalidRequestError) as e:
        CompletionRequest(prompt="hi", response_format={"type": "structural_tag"}).check_supported()
    assert e.value.param == "response_format"
    CompletionRequest(prompt="hi", response_format={"type": "text"}).check_supported()
    chat = [{"role": "user", "content": "x"}]
    # Tools are checked against the server's limits when served (sutra.server.tools); the deprecated
    # functions API is refused.
    tools = [{"type": "function", "function": {"name": "f"}}]
    ChatCompletionRequest(messages=chat, tools=tools, tool_choice="required").check_supported()
    with pytest.raises(InvalidRequestError) as e:
        ChatCompletionRequest(messages=chat, functions=[{"name": "f"}]).check_supported()
    assert e.value.param == "functions"


def test_the_models_generation_defaults_fill_only_the_fields_a_request_leaves_unset():
    defaults = {"temperature": 0.6, "top_p": 0.9, "top_k": 20}
    body = CompletionRequest(prompt="hi", temperature=0.0, top_k=5)
    params = body.sampling_params(8, None, defaults)
    assert (params.temperature, params.top_p, params.top_k) == (0.0, 0.9, 5)
    assert CompletionRequest(prompt="hi").sampling_params(8, None).temperature == 1.0  # no defaults given
