"""A real `sutra serve --instances 2` (the default model, two Ray instances behind one front end),
through the official `openai` client. One test: starting it takes a while on two cores."""

from __future__ import annotations

import openai
import pytest

from tests.server_process import run_server

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_serve_with_two_instances_answers_completions_and_streaming_chat():
    pytest.importorskip("ray")
    args = ["--instances", "2", "--threads-per-instance", "1", "--num-kv-blocks", "128"]
    with run_server(*args) as server:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        out = client.completions.create(
            model=server.model,
            prompt=["The capital of Japan is", "Once upon a time"],
            max_tokens=8,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert [c.index for c in out.choices] == [0, 1]
        assert all(c.finish_reason == "length" and c.text for c in out.choices)
        assert out.usage.completion_tokens == 16

        stream = client.chat.completions.create(
            model=server.model,
            messages=[{"role": "user", "content": "What is the capital of Japan?"}],
            max_tokens=24,
            temperature=0,
            stream=True,
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert "Tokyo" in text
        assert chunks[-1].choices[0].finish_reason == "stop"

        # /metrics sums the two instances' caches.
        assert server.metric("sutra:kv_cache_total_blocks") == 2 * 128
        server.wait_idle()
        server.stop()
        assert server.wait_exit(timeout=60) == 0
