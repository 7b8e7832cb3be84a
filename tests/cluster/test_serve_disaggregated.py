"""A real `sutra serve --prefill-instances 1 --decode-instances 1` (the default model on two Ray
instances) through the official `openai` client: streaming and plain completions give the text of
one in-process engine (itself checked against transformers in tests/engine/test_hand_off.py), every
request is handed off, and /metrics shows the roles, the hand-offs and the SLO attainment."""

from __future__ import annotations

import openai
import pytest

from sutra import LLM, SamplingParams
from tests.server_process import run_server

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROMPTS = ["The capital of Japan is", "Write a long story about a lighthouse keeper.", "List three colors:"]


def test_disaggregated_serve_matches_one_engine_and_reports_hand_offs():
    pytest.importorskip("ray")
    expected = [
        o.outputs[0].text
        for o in LLM(dtype="float32", num_kv_blocks=128).generate(
            PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False
        )
    ]
    args = [
        *("--prefill-instances", "1", "--decode-instances", "1", "--threads-per-instance", "1"),
        *("--num-kv-blocks", "128", "--dtype", "float32"),
        # Every request meets a 10-minute TTFT; only a 1-token one can meet a 1-microsecond TPOT.
        *("--slo-ttft-ms", "600000", "--slo-tpot-ms", "0.001"),
    ]
    with run_server(*args) as server:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        request = {
            "model": server.model,
            "max_tokens": 24,
            "temperature": 0,
            "extra_body": {"ignore_eos": True},
        }
        out = client.completions.create(prompt=PROMPTS[:2], **request)
        assert [c.text for c in out.choices] == expected[:2]
        stream = client.completions.create(prompt=PROMPTS[2], stream=True, **request)
        assert "".join(c.choices[0].text for c in stream if c.choices) == expected[2]
        client.completions.create(prompt="Hi", model=server.model, max_tokens=1)  # ends on prefill
        server.wait_idle()
        assert server.metric("sutra:handoffs_total", outcome="migrated") == 3
        assert server.metric("sutra:handoff_transfer_seconds_count") == 3
        assert server.metric("sutra:role_num_requests", role="prefill", state="parked") == 0
        assert server.metric("sutra:slo_requests_total", outcome="missed") == 3
        assert server.metric("sutra:slo_requests_total", outcome="attained") == 1
        assert server.metric("sutra:kv_cache_free_blocks") == 2 * 128
        server.stop()
        assert server.wait_exit(timeout=60) == 0
