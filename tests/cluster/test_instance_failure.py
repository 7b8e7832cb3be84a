"""An instance that dies: its requests in flight resume on the other instance (failover), which serves
on and takes every later request, and the client is dead only once every instance is."""

from __future__ import annotations

import asyncio
import time

import pytest
import ray

from sutra.cluster.client import ClusterClient
from sutra.engine.client import EngineDeadError
from sutra.sampling_params import SamplingParams

pytestmark = pytest.mark.ray


def test_a_killed_instance_hands_its_requests_over_and_dispatch_avoids_it(two_instances):
    params = SamplingParams(max_tokens=200, ignore_eos=True, temperature=0)

    async def first_delta(client: ClusterClient, request_id: str):
        stream = client.stream(request_id)
        await stream.__anext__()
        return stream

    async def drain(stream) -> list:
        return [delta async for delta in stream]

    async def main():
        client = two_instances.client("round-robin", load_refresh_s=0.05)
        client.start()
        try:
            await client.submit_many([("a", list(range(20, 60)), params)])
            await client.submit_many([("b", list(range(60, 100)), params)])
            assert (client.instance_of("a"), client.instance_of("b")) == ("i0", "i1")
            stream_a = await first_delta(client, "a")
            stream_b = await first_delta(client, "b")

            ray.kill(two_instances.actors["i0"])
            rest_a = await drain(stream_a)  # resumed on i1 (tests/cluster/test_failover.py)
            assert rest_a[-1].finished and rest_a[-1].completions[0].finish_reason == "length"
            assert client.failover.num_resumed == 1
            assert client.instance_ids == ["i1"] and client.dead_reason is None
            rest = await drain(stream_b)  # the other instance's request is untouched
            assert rest[-1].finished

            for i in range(3):  # round-robin's turn would come back to i0: it is skipped
                await client.submit_many([(f"later{i}", [7, 8, 9], SamplingParams(max_tokens=20))])
                assert client.instance_of(f"later{i}") == "i1"
                assert [d async for d in client.stream(f"later{i}")][-1].finished

            ray.kill(two_instances.actors["i1"])
            deadline = time.monotonic() + 20
            while client.dead_reason is None:
                assert time.monotonic() < deadline, "the client did not notice its last instance died"
                await asyncio.sleep(0.02)
            assert "every engine instance has died" in client.dead_reason
            with pytest.raises(EngineDeadError, match="every engine instance has died"):
                await client.submit_many([("too-late", [1, 2], SamplingParams(max_tokens=1))])
        finally:
            await client.shutdown()

    asyncio.run(main())
