"""`logit_bias` on both completion routes through the `openai` client: +100 forces a token, -100 bans
the greedy one, requests batched with a biased one are untouched, bad values are a 400 naming it."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

from tests.server.http_helpers import assert_error, assert_serving, post

pytestmark = pytest.mark.slow

PROMPT = "The capital of Japan is"
QUESTION = [{"role": "user", "content": "What is the capital of Japan?"}]


@pytest.fixture(scope="module")
def client(sutra_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{sutra_server.base_url}/v1", api_key="unused", max_retries=0)


def _token_id(server, text: str) -> int:
    ids = post(server, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()["tokens"]
    assert len(ids) == 1, f"{text!r} is not one token: {ids}"
    return ids[0]


def test_plus_100_forces_a_token_on_both_routes(client, sutra_server):
    paris = _token_id(sutra_server, " Paris")
    common = dict(model=sutra_server.model, max_tokens=3, temperature=0, logit_bias={str(paris): 100})
    out = client.completions.create(prompt=PROMPT, extra_body={"ignore_eos": True}, **common)
    assert out.choices[0].text == " Paris Paris Paris"
    chat = client.chat.completions.create(messages=QUESTION, **common)
    assert chat.choices[0].message.content == " Paris Paris Paris"
    sampled = client.completions.create(prompt=PROMPT, **{**common, "temperature": 1.0, "seed": 3})
    assert sampled.choices[0].text == " Paris Paris Paris"


def test_minus_100_bans_the_greedy_token(client, sutra_server):
    first = client.completions.create(model=sutra_server.model, prompt=PROMPT, max_tokens=1, temperature=0)
    greedy = _token_id(sutra_server, first.choices[0].text)
    banned = client.completions.create(
        model=sutra_server.model,
        prompt=PROMPT,
        max_tokens=4,
        temperature=0,
        logprobs=1,
        logit_bias={str(greedy): -100},
    )
    lp = banned.choices[0].logprobs
    assert not banned.choices[0].text.startswith(first.choices[0].text)
    # Logprobs are the model's own distribution, before the bias: the banned token is still its top.
    assert list(lp.top_logprobs[0]) == [first.choices[0].text] != [lp.tokens[0]]


def test_batch_mates_without_a_bias_are_unaffected(sutra_server):
    """A biased and an unbiased request run together; the unbiased one gets its solo greedy tokens."""
    aclient = openai.AsyncOpenAI(base_url=f"{sutra_server.base_url}/v1", api_key="unused", max_retries=0)
    paris = _token_id(sutra_server, " Paris")
    common = dict(model=sutra_server.model, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})

    async def run(prompt: str, bias: dict | None) -> str:
        out = await aclient.completions.create(prompt=prompt, logit_bias=bias, **common)
        return out.choices[0].text

    async def main() -> list[str]:
        solo = await run(PROMPT, None)
        together = await asyncio.gather(
            *(run(PROMPT, {str(paris): 100} if i % 2 else None) for i in range(6))
        )
        return [solo, *together]

    solo, *together = asyncio.run(main())
    assert together[1::2] == [" Paris" * 16] * 3
    assert together[0::2] == [solo] * 3


@pytest.mark.parametrize(
    ("bias", "contains"),
    [
        ({"abc": 5}, "logit_bias keys must be token ids (integers), got 'abc'"),
        ({"504": 101}, "logit_bias values must be numbers in [-100, 100], got 101.0 for token 504"),
        ({"504": -100.5}, "in [-100, 100]"),
        ({"49152": 5}, "logit_bias: token id 49152 is outside the vocabulary [0, 49152)"),
        ({"-1": 5}, "token id -1 is outside the vocabulary"),
        ({str(i): 1 for i in range(301)}, "logit_bias: at most 300 logit_bias entries are allowed, got 301"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_bad_bias_is_a_400_naming_it(sutra_server, path, bias, contains):
    base = {"prompt": PROMPT} if path == "/v1/completions" else {"messages": QUESTION}
    assert_error(
        post(sutra_server, path, {**base, "max_tokens": 2, "logit_bias": bias}), 400, "logit_bias", contains
    )
    assert_serving(sutra_server)


def test_non_finite_and_non_numeric_values_are_refused(sutra_server):
    # Python's JSON (the server's) reads NaN; the value must still be refused, not sampled with.
    raw = json.dumps({"prompt": PROMPT, "max_tokens": 2, "logit_bias": {"504": float("nan")}})
    assert_error(post(sutra_server, "/v1/completions", raw), 400, "logit_bias", "got nan")
    bad = {"prompt": PROMPT, "max_tokens": 2, "logit_bias": {"504": "high"}}
    assert_error(post(sutra_server, "/v1/completions", bad), 400, "logit_bias.504", "valid number")
    assert_serving(sutra_server)


def test_300_entries_are_served(sutra_server):
    body = {"prompt": PROMPT, "max_tokens": 2, "logit_bias": {str(i): -1 for i in range(300)}}
    response = post(sutra_server, "/v1/completions", body)
    assert response.status_code == 200, response.text
