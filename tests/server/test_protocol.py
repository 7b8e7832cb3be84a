"""Request-body mapping and server options, without a server."""

from __future__ import annotations

import pytest

from sutra.errors import InvalidRequestError
from sutra.server.common import resolve_max_tokens
from sutra.server.launcher import parse_api_keys, served_model_name
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
