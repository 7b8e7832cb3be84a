"""Sampling values that once made the sampler raise, and so failed every request in the same engine
step, are a 400 naming the field, and a stream running beside them finishes untouched."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

VOCAB = 49152  # SmolLM2's


def _post(server, body: dict) -> httpx.Response:
    # json.dumps writes inf and nan as the JSON extensions `Infinity` and `NaN`, as some clients do.
    return httpx.post(
        f"{server.base_url}/v1/completions",
        content=json.dumps(body),
        headers={"content-type": "application/json"},
        timeout=60,
    )


@pytest.mark.parametrize(
    ("extra", "param", "contains"),
    [
        (
            {"temperature": float("inf"), "min_tokens": 1},
            "temperature",
            "temperature must be a finite number",
        ),
        ({"temperature": 1e39, "min_tokens": 1}, "temperature", "temperature must be <= 100"),
        ({"top_p": float("nan")}, "top_p", "top_p must be a finite number"),
        # Refused for its length or for covering the vocabulary, whichever is checked first.
        ({"stop_token_ids": list(range(VOCAB)), "min_tokens": 1}, "stop_token_ids", "stop_token_ids"),
        ({"stop_token_ids": [VOCAB]}, "stop_token_ids", f"token id {VOCAB} is outside the vocabulary"),
    ],
)
def test_bad_sampling_value_is_400_and_a_running_stream_is_untouched(sutra_server, extra, param, contains):
    client = openai.OpenAI(base_url=f"{sutra_server.base_url}/v1", api_key="unused", max_retries=0)
    stream = client.completions.create(
        model=sutra_server.model,
        prompt="Tell me a long story about a lighthouse keeper.",
        max_tokens=48,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    received = [next(chunks)]  # the stream is running in the engine now
    reader = threading.Thread(target=lambda: received.extend(chunks))
    reader.start()
    response = _post(sutra_server, {"prompt": "Hello", "max_tokens": 8, **extra})
    reader.join(timeout=120)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and contains in error["message"]
    assert not reader.is_alive()
    assert received[-1].usage is not None and received[-1].usage.completion_tokens == 48
    finish = [c.finish_reason for chunk in received for c in chunk.choices if c.finish_reason]
    assert finish == ["length"]
    sutra_server.wait_idle()
    free = sutra_server.metric("sutra:kv_cache_free_blocks")
    assert free == sutra_server.metric("sutra:kv_cache_total_blocks")
