"""Fair scheduling through the real server: one tenant floods, the other is still served at once
under VTC (and waits behind the flood under FCFS). Order of events, not wall time, is asserted."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from tests.server_process import run_server

pytestmark = pytest.mark.slow

FLOOD = 12
SEATS = 2


async def _flood_then_calm(server) -> tuple[list[float], float, float]:
    """Returns the flood's finish times, the calm request's send time and its first-token time."""
    flood = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="key-flood", max_retries=0)
    calm = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="key-calm", max_retries=0)
    finished: list[float] = []

    async def one_flood(i: int) -> None:
        await flood.completions.create(
            model=server.model, prompt=f"Flood {i}:", max_tokens=24, extra_body={"ignore_eos": True}
        )
        finished.append(time.perf_counter())

    tasks = [asyncio.create_task(one_flood(i)) for i in range(FLOOD)]
    while server.metric("sutra:num_requests_waiting") < FLOOD - SEATS:  # the flood is queued
        await asyncio.sleep(0.05)
    sent = time.perf_counter()
    stream = await calm.completions.create(
        model=server.model, prompt="Hello", max_tokens=4, stream=True, extra_body={"ignore_eos": True}
    )
    first_token = None
    async for chunk in stream:
        if first_token is None and chunk.choices and chunk.choices[0].text:
            first_token = time.perf_counter()
    await asyncio.gather(*tasks)
    return finished, sent, first_token


@pytest.mark.parametrize("policy", ["vtc", "fcfs"])
def test_a_flooding_tenant_does_not_delay_the_other_under_vtc(policy):
    args = ("--scheduling-policy", policy, "--max-num-seqs", str(SEATS))
    args += ("--api-key", "flood:key-flood", "--api-key", "calm:key-calm")
    with run_server(*args) as server:
        finished, sent, first_token = asyncio.run(_flood_then_calm(server))
        served_before = sum(t < first_token for t in finished)
        print(
            f"{policy}: calm TTFT {first_token - sent:.2f} s, {served_before} flood requests finished first"
        )
        if policy == "vtc":
            # At most the requests holding a seat when it arrived finish first: it takes the next seat.
            assert served_before <= SEATS
        else:
            assert served_before >= FLOOD - SEATS  # FCFS: it waits behind the whole queued flood
        calm_tokens = server.metric("sutra:client_generation_tokens_total", client="calm")
        flood_tokens = server.metric("sutra:client_generation_tokens_total", client="flood")
        assert (calm_tokens, flood_tokens) == (4, FLOOD * 24)


def test_completion_estimate_header_and_error_metric(sutra_server):
    before = sutra_server.metric("sutra:completion_estimate_error_seconds_count", default=0.0)
    response = httpx.post(
        f"{sutra_server.base_url}/v1/completions",
        json={"prompt": "Once upon a time", "max_tokens": 16, "ignore_eos": True},
        timeout=60,
    )
    assert response.status_code == 200
    estimate = float(response.headers["x-sutra-estimated-completion-seconds"])
    assert estimate > 0
    with httpx.stream(
        "POST",
        f"{sutra_server.base_url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True},
        timeout=60,
    ) as streamed:
        assert float(streamed.headers["x-sutra-estimated-completion-seconds"]) > 0
        streamed.read()
    assert sutra_server.metric("sutra:completion_estimate_error_seconds_count") == before + 2
