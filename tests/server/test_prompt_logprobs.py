"""vLLM's `prompt_logprobs` and `echo` with `logprobs` on a real server through the `openai` client:
the prompt's logprobs match Hugging Face transformers' on the same weights, a cached prefix does not
stand in for them, and what cannot be served is refused by name."""

from __future__ import annotations

import openai
import pytest
import torch

from tests.engine.reference import hf_model
from tests.server.http_helpers import assert_error, assert_serving, post

pytestmark = pytest.mark.slow

PROMPT = "The capital of Japan is Tokyo, and the capital of France is"


@pytest.fixture(scope="module")
def client(sutra_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{sutra_server.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def prompt_ids(sutra_server) -> list[int]:
    return post(sutra_server, "/tokenize", {"prompt": PROMPT}).json()["tokens"]


def _complete(client, server, **kwargs):
    return client.completions.create(**{"model": server.model, "max_tokens": 4, "temperature": 0, **kwargs})


def _hf_logprobs(ids: list[int]) -> torch.Tensor:
    """Row p: HF's log-softmax scoring token p + 1."""
    with torch.inference_mode():
        return torch.log_softmax(hf_model()(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)


def test_completion_prompt_logprobs_match_hf(client, sutra_server, prompt_ids):
    out = _complete(client, sutra_server, prompt=PROMPT, extra_body={"prompt_logprobs": 2})
    scored = out.choices[0].prompt_logprobs
    assert len(scored) == out.usage.prompt_tokens == len(prompt_ids) and scored[0] is None
    reference = _hf_logprobs(prompt_ids)
    for p, entry in enumerate(scored[1:]):
        own = entry[str(prompt_ids[p + 1])]
        assert own["logprob"] == pytest.approx(float(reference[p, prompt_ids[p + 1]]), abs=1e-3)
        assert own["rank"] == int((reference[p] > reference[p, prompt_ids[p + 1]]).sum()) + 1
        top = sorted(((v["rank"], int(t)) for t, v in entry.items() if v["rank"] <= 2))
        assert [t for _, t in top][:2] == reference[p].topk(2).indices.tolist()
        assert len(entry) <= 3  # the prompt's token and the top 2, which may include it
    assert scored[1][str(prompt_ids[1])]["decoded_token"] == " capital"
    assert out.choices[0].logprobs is None


def test_a_cached_prompt_is_scored_again(client, sutra_server):
    long_prompt = " ".join([PROMPT] * 4)  # full blocks of 16 tokens, which the prefix cache holds
    first = _complete(client, sutra_server, prompt=long_prompt)
    assert first.choices[0].text
    again = _complete(client, sutra_server, prompt=long_prompt, extra_body={"prompt_logprobs": 0})
    assert again.usage.prompt_tokens_details.cached_tokens == 0
    assert all(len(entry) == 1 for entry in again.choices[0].prompt_logprobs[1:])
    plain = _complete(client, sutra_server, prompt=long_prompt)
    assert plain.usage.prompt_tokens_details.cached_tokens > 0  # the cache still serves the others


def test_every_prompt_of_a_batch_and_each_of_its_choices(client, sutra_server, prompt_ids):
    other = "Once upon a time"
    out = _complete(client, sutra_server, prompt=[PROMPT, other], n=2, extra_body={"prompt_logprobs": 1})
    lengths = [len(c.prompt_logprobs) for c in out.choices]
    assert lengths[:2] == [len(prompt_ids)] * 2 and lengths[2] == lengths[3] < len(prompt_ids)
    assert out.choices[0].prompt_logprobs == out.choices[1].prompt_logprobs


def test_echo_with_logprobs_scores_the_prompt_then_the_completion(client, sutra_server, prompt_ids):
    out = _complete(client, sutra_server, prompt=PROMPT, echo=True, logprobs=2)
    plain = _complete(client, sutra_server, prompt=PROMPT, logprobs=2)
    lp, n = out.choices[0].logprobs, len(prompt_ids)
    assert out.choices[0].text == PROMPT + plain.choices[0].text
    assert len(lp.tokens) == n + len(plain.choices[0].logprobs.tokens)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    reference = _hf_logprobs(prompt_ids)
    for p in range(1, n):
        assert lp.token_logprobs[p] == pytest.approx(float(reference[p - 1, prompt_ids[p]]), abs=1e-3)
        assert len(lp.top_logprobs[p]) == 2
    assert lp.token_logprobs[n:] == pytest.approx(plain.choices[0].logprobs.token_logprobs, abs=1e-4)
    # Offsets count the echoed prompt: the completion's first token starts where the prompt ends.
    assert lp.text_offset[0] == 0 and lp.text_offset[n] == len(PROMPT)
    assert "".join(lp.tokens) == out.choices[0].text
    chunks = list(_complete(client, sutra_server, prompt=PROMPT, echo=True, logprobs=2, stream=True))
    streamed = [t for c in chunks for ch in c.choices if ch.logprobs for t in ch.logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-4)


def test_chat_prompt_logprobs(client, sutra_server):
    out = client.chat.completions.create(
        model=sutra_server.model,
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=3,
        temperature=0,
        extra_body={"prompt_logprobs": 1},
    )
    scored = out.model_extra["prompt_logprobs"]
    assert len(scored) == out.usage.prompt_tokens and scored[0] is None
    assert all(1 <= len(entry) <= 2 for entry in scored[1:])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"prompt_logprobs": 1, "stream": True}, "not available when stream is true"),
        ({"prompt_logprobs": 21}, "must be in [0, 20]"),
        ({"prompt_logprobs": -1}, "must be in [0, 20]"),
        ({"prompt_logprobs": "all"}, ""),
    ],
)
def test_refusals_name_the_field(sutra_server, body, message):
    for path, base in (
        ("/v1/completions", {"prompt": PROMPT}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ):
        assert_error(
            post(sutra_server, path, {**base, "max_tokens": 2, **body}), 400, "prompt_logprobs", message
        )
    assert_serving(sutra_server)
