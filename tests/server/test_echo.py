"""`echo` on /v1/completions through the `openai` client: each choice's text starts with its prompt,
streamed or not (with logprobs: tests/server/test_prompt_logprobs.py); chat refuses it."""

from __future__ import annotations

import openai
import pytest

from tests.server.http_helpers import assert_error, assert_serving, post

pytestmark = pytest.mark.slow

PROMPT = "The capital of Japan is"
OTHER = "Once upon a time"


@pytest.fixture(scope="module")
def client(sutra_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{sutra_server.base_url}/v1", api_key="unused", max_retries=0)


def _complete(client, server, **kwargs):
    return client.completions.create(**{"model": server.model, "max_tokens": 8, "temperature": 0, **kwargs})


def test_echo_prepends_the_prompt_to_every_choice(client, sutra_server):
    plain = _complete(client, sutra_server, prompt=PROMPT)
    echoed = _complete(client, sutra_server, prompt=PROMPT, echo=True, n=2)
    assert [c.text for c in echoed.choices] == [PROMPT + plain.choices[0].text] * 2
    # The echoed prompt is not generated: usage is what it is without echo.
    assert echoed.usage.prompt_tokens == plain.usage.prompt_tokens
    assert echoed.usage.completion_tokens == 2 * plain.usage.completion_tokens


def test_echo_with_a_stop_string_echoes_the_prompt_and_stops_the_completion(client, sutra_server):
    out = _complete(client, sutra_server, prompt=PROMPT, echo=True, max_tokens=20, stop=[" Alps"])
    assert out.choices[0].text == PROMPT + " Tokyo.\n\nThe Japanese"
    assert out.choices[0].finish_reason == "stop"


def test_a_batch_echoes_each_prompt_and_token_prompts_are_decoded(client, sutra_server):
    plain = _complete(client, sutra_server, prompt=[PROMPT, OTHER])
    expected = [PROMPT + plain.choices[0].text, OTHER + plain.choices[1].text]
    assert [
        c.text for c in _complete(client, sutra_server, prompt=[PROMPT, OTHER], echo=True).choices
    ] == expected
    ids = [post(sutra_server, "/tokenize", {"prompt": p}).json()["tokens"] for p in (PROMPT, OTHER)]
    assert [c.text for c in _complete(client, sutra_server, prompt=ids, echo=True).choices] == expected


def test_streamed_echo_equals_the_whole_text(client, sutra_server):
    whole = _complete(client, sutra_server, prompt=[PROMPT, OTHER], echo=True, n=2)
    chunks = list(_complete(client, sutra_server, prompt=[PROMPT, OTHER], echo=True, n=2, stream=True))
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            if choice.index not in texts:  # the prompt leads the choice's first chunk
                assert choice.text.startswith(PROMPT if choice.index < 2 else OTHER)
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert [texts[i] for i in range(4)] == [c.text for c in whole.choices]


def test_chat_refuses_echo(sutra_server):
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "echo": True}
    assert_error(post(sutra_server, "/v1/chat/completions", chat), 400, "echo", "not supported")
    assert_serving(sutra_server)
