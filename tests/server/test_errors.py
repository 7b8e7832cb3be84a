"""Bad requests get OpenAI error bodies with the right status, and the server keeps serving with no
KV block lost. Raw HTTP, so malformed bodies reach the server as sent."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from tests.server_process import run_server

pytestmark = pytest.mark.slow


def _post(server, path: str, body, headers: dict | None = None) -> httpx.Response:
    kwargs = {"content": body} if isinstance(body, (str, bytes)) else {"json": body}
    return httpx.post(
        f"{server.base_url}{path}",
        headers={"content-type": "application/json", **(headers or {})},
        timeout=60,
        **kwargs,
    )


def _assert_error(
    response: httpx.Response, status: int, param: str | None = None, contains: str = ""
) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert contains in error["message"]
    return error


def _assert_healthy(server) -> None:
    server.wait_idle()
    assert server.metric("sutra:kv_cache_free_blocks") == server.metric("sutra:kv_cache_total_blocks")
    ok = _post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize(
    ("body", "param", "contains"),
    [
        ({"prompt": "hi", "top_p": 1.5}, "top_p", "top_p must be in (0, 1], got 1.5"),
        ({"prompt": "hi", "temperature": -1}, "temperature", "temperature must be >= 0"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens", "max_tokens must be >= 1, got 0"),
        ({"prompt": "hi", "n": 0}, "n", "n must be >= 1"),
        (
            {"prompt": "hi", "max_tokens": 4, "min_tokens": 5},
            "min_tokens",
            "min_tokens must be in [0, max_tokens=4]",
        ),
        ({"prompt": "hi", "logprobs": 50}, "logprobs", "logprobs must be in [0, 20]"),
        ({"prompt": "hi", "max_tokens": "many"}, "max_tokens", "valid integer"),
        ({"max_tokens": 4}, "prompt", "Field required"),
        ({"prompt": ""}, "prompt", "the prompt is empty"),
        ({"prompt": [99999999]}, "prompt", "outside the vocabulary"),
        ({"prompt": "hi", "logit_bias": {"x": 5}}, "logit_bias", "keys must be token ids"),
        ({"prompt": "hi", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs", "when stream is true"),
    ],
)
def test_invalid_completion_fields_are_400_and_named(sutra_server, body, param, contains):
    _assert_error(_post(sutra_server, "/v1/completions", body), 400, param, contains)


def test_invalid_chat_fields_are_400_and_named(sutra_server):
    _assert_error(_post(sutra_server, "/v1/chat/completions", {"messages": []}), 400, "messages")
    bad_role = {"messages": [{"role": "robot", "content": "hi"}]}
    _assert_error(_post(sutra_server, "/v1/chat/completions", bad_role), 400, "messages.0.role")
    user = [{"role": "user", "content": "hi"}]
    tools = {"messages": user, "tools": [{"type": "function", "function": {"name": "no spaces"}}]}
    _assert_error(_post(sutra_server, "/v1/chat/completions", tools), 400, "tools.0.function.name")
    top = {"messages": user, "max_completion_tokens": 0}
    _assert_error(_post(sutra_server, "/v1/chat/completions", top), 400, "max_completion_tokens")
    _assert_healthy(sutra_server)


USER = [{"role": "user", "content": "hi"}]
LONE = "a\ud800b"  # json.dumps escapes it as JSON allows; no UTF-8 encoder accepts it


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": LONE}, "prompt"),
        ("/v1/completions", {"prompt": ["fine", LONE]}, "prompt.1"),
        ("/v1/completions", {"prompt": "hi", "stop": LONE}, "stop"),
        ("/v1/completions", {"prompt": "hi", "stop": ["x", LONE]}, "stop.1"),
        ("/v1/completions", {"prompt": "hi", "user": "\udc00"}, "user"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONE}]}, "messages.0.content"),
        (
            "/v1/chat/completions",
            {"messages": [*USER, {"role": "user", "content": [{"type": "text", "text": LONE}]}]},
            "messages.1.content.0.text",
        ),
        ("/v1/chat/completions", {"messages": [{**USER[0], "name": LONE}]}, "messages.0.name"),
        ("/v1/chat/completions", {"messages": USER, "stop": [LONE]}, "stop.0"),
        ("/v1/chat/completions", {"messages": USER, "user": LONE}, "user"),
    ],
)
def test_lone_surrogates_are_400_naming_the_field(sutra_server, path, body, param):
    prompt_tokens = sutra_server.metric("sutra:prompt_tokens_total", default=0.0)
    raw = json.dumps({"max_tokens": 2, **body})  # ASCII JSON: the surrogate travels as \ud800
    _assert_error(_post(sutra_server, path, raw), 400, param, "lone UTF-16 surrogate")
    assert (
        sutra_server.metric("sutra:prompt_tokens_total", default=0.0) == prompt_tokens
    )  # it never reached the engine
    metrics = httpx.get(f"{sutra_server.base_url}/metrics")
    assert metrics.status_code == 200
    _assert_healthy(sutra_server)


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/v1/completions", "bad_words", ["x"]),
        ("/v1/completions", "guided_decoding_backend", "xgrammar"),
        ("/v1/completions", "guided_whitespace_pattern", " "),
        ("/v1/completions", "response_format", {"type": "structural_tag"}),
        ("/v1/chat/completions", "guided_decoding_backend", "xgrammar"),
        ("/v1/chat/completions", "prompt_logprobs", 21),
        ("/v1/chat/completions", "tool_choice", "auto"),
        ("/v1/chat/completions", "tool_choice", {"type": "function", "function": {"name": "f"}}),
        ("/v1/chat/completions", "functions", [{"name": "f", "parameters": {}}]),
        ("/v1/chat/completions", "function_call", "auto"),
        ("/v1/chat/completions", "top_logprobs", 21),
    ],
)
def test_fields_we_cannot_honour_are_refused_by_name(sutra_server, path, field, value):
    """A client that relies on one of these must not get an answer that silently ignored it."""
    body = {"prompt": "hi"} if path == "/v1/completions" else {"messages": USER, "logprobs": True}
    _assert_error(_post(sutra_server, path, {**body, "max_tokens": 2, field: value}), 400, field, field)


def test_tool_choice_none_without_tools_is_served(sutra_server):
    for choice in ("none", None):
        body = {"messages": USER, "max_tokens": 2, "tool_choice": choice}
        assert _post(sutra_server, "/v1/chat/completions", body).status_code == 200


def test_malformed_json_is_400_not_422(sutra_server):
    _assert_error(_post(sutra_server, "/v1/completions", '{"prompt": "hi", '), 400, None, "not valid JSON")
    _assert_error(_post(sutra_server, "/v1/completions", "[1, 2]"), 400)
    _assert_healthy(sutra_server)


def test_prompt_plus_max_tokens_over_the_context(sutra_server):
    context = httpx.get(f"{sutra_server.base_url}/v1/models").json()["data"][0]["max_model_len"]
    prompt = " hello" * 100  # 100 tokens
    over = _post(sutra_server, "/v1/completions", {"prompt": prompt, "max_tokens": context})
    error = _assert_error(over, 400, "max_tokens", f"maximum context length is {context} tokens")
    assert f"{context + 100} tokens (100 in the prompt, {context} for the completion)" in error["message"]
    too_long = _post(sutra_server, "/v1/completions", {"prompt": [42] * (context + 5), "max_tokens": 1})
    _assert_error(
        too_long,
        400,
        "prompt",
        f"the prompt has {context + 5} tokens but the model's context length is {context}",
    )
    _assert_healthy(sutra_server)


def test_unknown_model_and_route_are_404(sutra_server):
    error = _assert_error(
        _post(sutra_server, "/v1/completions", {"model": "gpt-9", "prompt": "hi"}), 404, "model"
    )
    assert error["code"] == "model_not_found" and "gpt-9" in error["message"]
    _assert_error(httpx.get(f"{sutra_server.base_url}/v1/nothing-here"), 404)
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=f"{sutra_server.base_url}/v1", api_key="x").completions.create(
            model="gpt-9", prompt="hi"
        )


def test_disconnected_stream_aborts_and_frees_blocks(sutra_server):
    aborted_before = _aborted(sutra_server)
    body = {"prompt": "Tell me a long story.", "max_tokens": 2000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{sutra_server.base_url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]  # a few tokens, then hang up
        assert all(line.startswith("data: ") or line == "" for line in received)
        assert sutra_server.metric("sutra:kv_cache_free_blocks") < sutra_server.metric(
            "sutra:kv_cache_total_blocks"
        )
    deadline = time.monotonic() + 30
    while _aborted(sutra_server) == aborted_before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _aborted(sutra_server) == aborted_before + 1
    _assert_healthy(sutra_server)


def test_disconnected_whole_request_aborts_too(sutra_server):
    aborted_before = _aborted(sutra_server)
    body = {"prompt": "Tell me a long story.", "max_tokens": 2000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        _post_with_timeout(sutra_server, body, timeout=1.0)
    deadline = time.monotonic() + 30
    while _aborted(sutra_server) == aborted_before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _aborted(sutra_server) == aborted_before + 1
    _assert_healthy(sutra_server)


def _post_with_timeout(server, body: dict, timeout: float) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=timeout)


def _aborted(server) -> float:
    return server.metric("sutra:request_success_total", default=0.0, finished_reason="abort")


@pytest.fixture(scope="module")
def guarded_server():
    """Two tenants' keys, one sequence at a time and a waiting queue of at most two."""
    args = (
        "--api-key",
        "alice:key-a",
        "--api-key",
        "key-b",
        "--max-num-seqs",
        "1",
        "--max-waiting-requests",
        "2",
    )
    with run_server(*args) as server:
        yield server


def test_api_key_required_on_v1_only(guarded_server):
    body = {"prompt": "hi", "max_tokens": 2}
    error = _assert_error(_post(guarded_server, "/v1/completions", body), 401)
    assert error["code"] == "invalid_api_key"
    _assert_error(_post(guarded_server, "/v1/completions", body, {"authorization": "Bearer wrong"}), 401)
    assert httpx.get(f"{guarded_server.base_url}/v1/models").status_code == 401
    assert httpx.get(f"{guarded_server.base_url}/health").status_code == 200
    assert httpx.get(f"{guarded_server.base_url}/metrics").status_code == 200
    for key in ("key-a", "key-b"):
        ok = _post(guarded_server, "/v1/completions", body, {"authorization": f"Bearer {key}"})
        assert ok.status_code == 200, ok.text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{guarded_server.base_url}/v1", api_key="wrong", max_retries=0).models.list()
    # The key's tenant is the client, whatever `user` says.
    alice = guarded_server.metric("sutra:client_generation_tokens_total", client="alice")
    assert alice >= 1
    assert guarded_server.metric("sutra:client_generation_tokens_total", client="key2") >= 1


def test_full_waiting_queue_is_503(guarded_server):
    client = openai.AsyncOpenAI(base_url=f"{guarded_server.base_url}/v1", api_key="key-a", max_retries=0)

    async def one():
        try:
            out = await client.completions.create(
                model=guarded_server.model, prompt="Count:", max_tokens=30, extra_body={"ignore_eos": True}
            )
            return out.usage.completion_tokens
        except openai.APIStatusError as e:
            return e

    async def main():
        return await asyncio.gather(*(one() for _ in range(6)))

    results = asyncio.run(main())
    rejected = [r for r in results if isinstance(r, openai.APIStatusError)]
    served = [r for r in results if not isinstance(r, openai.APIStatusError)]
    assert rejected and served
    assert all(r.status_code == 503 and r.body["code"] == "queue_full" for r in rejected)
    assert all(tokens == 30 for tokens in served)
    guarded_server.wait_idle()
    assert guarded_server.metric("sutra:kv_cache_free_blocks") == guarded_server.metric(
        "sutra:kv_cache_total_blocks"
    )
