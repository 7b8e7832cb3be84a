"""Live migration between two Ray instances of the tiny random model, driven by the cluster client:
a stream across a move has no gap or duplicate and the same tokens as one local engine; a client
that leaves mid-move and a refused move leave both instances at baseline; a drain moves every
request off an instance and they all finish; the llumnix trigger moves a request off a crowded
instance by itself."""

from __future__ import annotations

import asyncio

import pytest

from sutra.cluster.client import ClusterClient
from sutra.cluster.dispatch import RoundRobinPolicy
from sutra.cluster.manager import Cluster
from sutra.core.migration import MigrationAborted
from sutra.engine.client import RequestDelta
from sutra.engine.engine import LLMEngine
from sutra.sampling_params import SamplingParams
from tests.cluster.conftest import TINY_CONFIG
from tests.cluster.test_client import _run_offline, _wait_for, _with_client

pytestmark = pytest.mark.ray

GREEDY = SamplingParams(max_tokens=120, ignore_eos=True, temperature=0)
PROMPT = list(range(200, 260))


@pytest.fixture(scope="module")
def reference() -> list[int]:
    out = _run_offline(LLMEngine(TINY_CONFIG), [("ref", PROMPT, GREEDY)])
    return out["ref"].outputs[0].token_ids


async def _collect(client: ClusterClient, request_id: str, seen: list[RequestDelta]) -> None:
    async for delta in client.stream(request_id):
        seen.append(delta)


def _tokens(seen: list[RequestDelta]) -> list[int]:
    return [t for d in seen for t in d.completions[0].token_ids]


async def _at_baseline(client: ClusterClient) -> None:
    def idle() -> bool:
        loads = client.loads()
        return len(loads) == 2 and all(x.used_blocks == 0 and x.num_running == 0 for x in loads.values())

    await _wait_for(idle, what="both instances idle with every block free")


def test_a_stream_across_a_live_migration_has_no_gap_or_duplicate(two_instances, reference):
    async def body(client: ClusterClient):
        migrated = []
        client.migrator.listeners.append(migrated.append)
        await client.submit_many([("r", PROMPT, GREEDY)])
        source = client.instance_of("r")
        destination = next(i for i in client.instance_ids if i != source)
        seen: list[RequestDelta] = []
        reader = asyncio.create_task(_collect(client, "r", seen))
        await _wait_for(lambda: len(_tokens(seen)) >= 10, what="10 tokens")
        result = await client.migrator.migrate("r", destination, last_stage_blocks=0)
        assert result.migrated, result.reason
        # The stream follows the source's "moved" update (which orders it behind the last tokens
        # from there), which comes over the source's poll.
        await _wait_for(lambda: client.instance_of("r") in (destination, None), what="the move seen")
        await asyncio.wait_for(reader, 60)
        await _at_baseline(client)
        return result, seen, migrated

    result, seen, migrated = asyncio.run(_with_client(two_instances, RoundRobinPolicy(), body))
    assert _tokens(seen) == reference
    assert seen[-1].finished and seen[-1].completions[0].finish_reason == "length"
    assert result.stages >= 1 and result.bytes_copied > 0 and migrated == [result]


def test_a_client_leaving_mid_migration_leaves_both_instances_at_baseline(two_instances):
    async def body(client: ClusterClient):
        await client.submit_many([("gone", PROMPT, GREEDY)])
        source = client.instance_of("gone")
        destination = next(i for i in client.instance_ids if i != source)
        seen: list[RequestDelta] = []
        reader = asyncio.create_task(_collect(client, "gone", seen))
        await _wait_for(lambda: len(_tokens(seen)) >= 5, what="5 tokens")
        moving = asyncio.create_task(client.migrator.migrate("gone", destination, last_stage_blocks=0))
        await asyncio.sleep(0)
        reader.cancel()  # the client disconnects while its request moves
        await asyncio.gather(reader, return_exceptions=True)
        await moving
        await _at_baseline(client)

    asyncio.run(_with_client(two_instances, RoundRobinPolicy(), body))


def test_moves_that_cannot_happen_are_refused_and_change_nothing(two_instances, reference):
    async def body(client: ClusterClient):
        await client.submit_many([("r", PROMPT, GREEDY)])
        source = client.instance_of("r")
        seen: list[RequestDelta] = []
        reader = asyncio.create_task(_collect(client, "r", seen))
        with pytest.raises(MigrationAborted, match="already runs"):
            await client.migrator.migrate("r", source)
        with pytest.raises(MigrationAborted, match="no engine instance"):
            await client.migrator.migrate("r", "i9")
        with pytest.raises(MigrationAborted, match="not in flight"):
            await client.migrator.migrate("nobody", source)
        await asyncio.wait_for(reader, 60)
        await _at_baseline(client)
        return seen

    seen = asyncio.run(_with_client(two_instances, RoundRobinPolicy(), body))
    assert _tokens(seen) == reference


def test_the_llumnix_trigger_moves_a_request_off_a_crowded_instance(two_instances, reference):
    async def body(client: ClusterClient):
        for rid in ("a", "b", "c"):  # round-robin: a and c on one instance, b on the other
            await client.submit_many([(rid, PROMPT, GREEDY)])
        crowded, other = client.instance_of("a"), client.instance_of("b")
        assert client.instance_of("c") == crowded
        client.abort("b")  # now one instance runs two requests and the other none
        seen = {rid: [] for rid in ("a", "c")}
        readers = [asyncio.create_task(_collect(client, rid, seen[rid])) for rid in seen]

        def lopsided() -> bool:
            loads = client.loads()
            return loads[crowded].num_running == 2 and loads[other].num_running == 0

        await _wait_for(lopsided, what="two requests on one instance, none on the other")
        client.migrator.rebalancer.out_threshold = 40.0  # blocks per running request
        moved = await client.migrator.rebalance()
        await _wait_for(lambda: any(client.instance_of(rid) == other for rid in seen), what="the move seen")
        owners = {client.instance_of(rid) for rid in seen}
        await asyncio.gather(*readers)
        await _at_baseline(client)
        return moved, owners, seen

    moved, owners, seen = asyncio.run(_with_client(two_instances, RoundRobinPolicy(), body))
    assert moved == 1 and len(owners) == 2  # one request each now
    assert all(_tokens(s) == reference for s in seen.values())


def test_a_drain_moves_every_request_off_and_all_of_them_finish(ray_session, reference):
    cluster = Cluster.start(TINY_CONFIG, 2, threads_per_instance=1, ready_timeout_s=300)
    try:

        async def body(client: ClusterClient):
            jobs = [f"d{i}" for i in range(4)]
            for rid in jobs:
                await client.submit_many([(rid, PROMPT, GREEDY)])
            seen = {rid: [] for rid in jobs}
            readers = [asyncio.create_task(_collect(client, rid, seen[rid])) for rid in jobs]
            await _wait_for(lambda: all(len(_tokens(s)) >= 3 for s in seen.values()), what="all decoding")
            drained = client.instance_of(jobs[0])
            report = await client.migrator.drain(drained, timeout_s=60)
            assert report["left"] == 0 and report["moved"] >= 2, report
            assert client.requests_on(drained) == []
            await asyncio.gather(*readers)
            await client.retire(drained)
            assert drained not in client.instance_ids
            return seen

        seen = asyncio.run(_with_client(cluster, RoundRobinPolicy(), body))
        assert all(_tokens(s) == reference for s in seen.values())
    finally:
        cluster.shutdown()


def test_a_source_killed_mid_migration_leaves_no_block_reserved_on_the_destination(ray_session):
    from ray import kill

    from sutra.cluster.migrator import ActorPeer

    cluster = Cluster.start(TINY_CONFIG, 2, threads_per_instance=1, ready_timeout_s=300)
    try:

        async def body(client: ClusterClient):
            await client.submit_many([("r", PROMPT, GREEDY)])
            seen: list[RequestDelta] = []
            reader = asyncio.create_task(_collect(client, "r", seen))
            await _wait_for(lambda: len(_tokens(seen)) >= 5, what="5 tokens")
            source = client.instance_of("r")
            destination = next(i for i in client.instance_ids if i != source)
            src, dst = ActorPeer(client, source), ActorPeer(client, destination)
            layout = await src.out_begin("r", "m", {"last_stage_blocks": 0})
            await dst.in_open("m", "r", layout)
            await dst.in_stage("m", await src.out_stage("m"))
            await _wait_for(lambda: client.loads()[destination].used_blocks > 0, what="blocks reserved")
            kill(client.actor_of(source))  # the source dies mid pre-copy and never calls again
            await asyncio.gather(reader, return_exceptions=True)
            # The destination's lease (10 s) runs out and its reservation comes back.
            await _wait_for(lambda: client.loads()[destination].used_blocks == 0, timeout_s=30, what="freed")

        asyncio.run(_with_client(cluster, RoundRobinPolicy(), body))
    finally:
        cluster.shutdown()
