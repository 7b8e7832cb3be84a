"""An operator caps how urgent a `priority` each API-key tenant may ask for: under the priority policy
a capped tenant's request asking to jump the queue is served at its cap (not refused), so it neither
goes ahead of a more urgent tenant nor preempts running requests."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from sutra.server.tenants import PriorityCaps, parse_priority_caps
from tests.server_process import run_server


def test_caps_clamp_only_towards_less_urgent():
    caps = PriorityCaps({"low": 5}, default=2)
    assert caps.clamp("low", -100) == 5 and caps.clamp("low", 9) == 9
    assert caps.clamp("other", -1) == 2 and caps.clamp(None, 0) == 2 and caps.clamp(None, 7) == 7
    assert PriorityCaps().clamp("any", -(10**9)) == -(10**9)


@pytest.mark.parametrize(
    "spec,match",
    [("low", "TENANT:N"), ("low:x", "TENANT:N"), (":3", "TENANT:N"), ("ghost:1", "names no API-key tenant")],
)
def test_bad_tenant_priority_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_priority_caps([spec], None, {"low", "vip"})
    assert parse_priority_caps(["vip:-3", "a:b:4"], 1, {"vip", "a:b"}) == PriorityCaps(
        {"vip": -3, "a:b": 4}, 1
    )


async def _queue_jump(server) -> tuple[list[str], float]:
    """While vip's long request runs, low asks for priority -100, then vip for 1. Returns the order
    the two finish in, and the preemptions counted meanwhile."""
    vip = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="key-vip", max_retries=0)
    low = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="key-low", max_retries=0)
    preemptions = server.metric("sutra:num_preemptions_total", default=0.0)
    finished: list[str] = []

    async def send(client: openai.AsyncOpenAI, name: str, priority: int, max_tokens: int) -> None:
        reply = await client.completions.create(
            model=server.model,
            prompt=f"Request of {name}:",
            max_tokens=max_tokens,
            extra_body={"ignore_eos": True, "priority": priority},
        )
        assert reply.usage.completion_tokens == max_tokens  # served, not refused
        finished.append(name)

    async def queued(n: int) -> None:
        """Until n requests wait (or low already ran: it jumped the queue)."""
        deadline = time.monotonic() + 60
        while server.metric("sutra:num_requests_waiting") < n and "low" not in finished:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)

    blocker = asyncio.create_task(send(vip, "blocker", 0, 160))
    while server.metric("sutra:num_requests_running") < 1:
        await asyncio.sleep(0.02)
    jumper = asyncio.create_task(send(low, "low", -100, 2))
    await queued(1)
    urgent = asyncio.create_task(send(vip, "vip", 1, 2))
    await queued(2)
    await asyncio.gather(blocker, jumper, urgent)
    return finished, server.metric("sutra:num_preemptions_total", default=0.0) - preemptions


@pytest.mark.slow
@pytest.mark.parametrize("capped", [True, False])
def test_a_capped_tenant_cannot_jump_the_queue_under_priority(capped):
    args = ["--scheduling-policy", "priority", "--max-num-seqs", "1", "--num-kv-blocks", "64"]
    args += ["--api-key", "vip:key-vip", "--api-key", "low:key-low"]
    if capped:
        args += ["--tenant-priority", "low:5"]
    with run_server(*args) as server:
        finished, preemptions = asyncio.run(_queue_jump(server))
    if capped:  # low is served at 5: after vip's 1, and it preempts nothing
        assert (finished, preemptions) == (["blocker", "vip", "low"], 0)
    else:  # low's -100 evicts the running blocker (priority 0) and goes first
        assert finished[0] == "low" and preemptions >= 1


@pytest.mark.slow
def test_unknown_tenant_in_tenant_priority_stops_the_server():
    with pytest.raises(RuntimeError, match="names no API-key tenant"):
        with run_server("--api-key", "vip:key-vip", "--tenant-priority", "ghost:1", startup_timeout=60):
            pass
