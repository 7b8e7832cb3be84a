"""Disaggregated serving on Ray (tiny random model): one prefill and one decode instance. Every
request's first token comes from the prefill instance, which parks it; the decode instance pulls it
and finishes it; the tokens equal one local engine's. A decode instance short of room leaves requests
parked on the prefill side until it has some, and nothing is lost. A client leaving while its request
is parked, or while it is pulled, leaves every block free on both sides."""

from __future__ import annotations

import asyncio

import pytest

from sutra.cluster.client import ClusterClient
from sutra.cluster.handoff import HandOffRecord
from sutra.cluster.manager import Cluster
from sutra.engine.client import RequestDelta
from sutra.engine.engine import LLMEngine
from sutra.sampling_params import SamplingParams
from tests.cluster.conftest import TINY_CONFIG
from tests.cluster.test_client import _run_offline, _wait_for, _with_client
from tests.cluster.test_migration import _collect, _tokens

pytestmark = pytest.mark.ray

GREEDY = SamplingParams(max_tokens=40, ignore_eos=True, temperature=0)


@pytest.fixture(scope="module")
def pd_cluster(ray_session):
    cluster = Cluster.start(
        TINY_CONFIG, 0, prefill_instances=1, decode_instances=1, threads_per_instance=1, ready_timeout_s=300
    )
    try:
        yield cluster
    finally:
        cluster.shutdown()


def _jobs(n: int, prompt_len: int = 60, prefix: str = "r") -> list[tuple[str, list[int], SamplingParams]]:
    # Ids unique across tests: an instance keeps updates its last client had not acknowledged.
    return [(f"{prefix}{i}", [(i * 37 + k) % 200 + 5 for k in range(prompt_len)], GREEDY) for i in range(n)]


async def _at_baseline(client: ClusterClient) -> None:
    def idle() -> bool:
        loads = client.loads()
        return len(loads) == 2 and all(
            x.used_blocks == 0 and x.num_running == 0 and x.num_parked == 0 for x in loads.values()
        )

    await _wait_for(idle, what="both instances idle with every block free")


def _run_on_fresh_cluster(body) -> dict[str, list[RequestDelta]]:
    """body(client) on a 1 prefill + 1 decode cluster of its own (it will lose an instance)."""
    cluster = Cluster.start(
        TINY_CONFIG, 0, prefill_instances=1, decode_instances=1, threads_per_instance=1, ready_timeout_s=300
    )
    try:
        return asyncio.run(_with_client(cluster, "least-load", body))
    finally:
        cluster.shutdown()


def test_the_roles_are_what_serve_asked_for(pd_cluster):
    roles = {i: info.role for i, info in pd_cluster.infos.items()}
    assert roles == {"p0": "prefill", "d0": "decode"}


def test_requests_prefill_on_one_instance_decode_on_the_other_and_match_one_engine(pd_cluster):
    jobs = _jobs(5, prefix="match-")
    reference = _run_offline(LLMEngine(TINY_CONFIG), jobs)

    async def body(client: ClusterClient):
        records: list[HandOffRecord] = []
        client.handoffs.listeners.append(records.append)
        for job in jobs:
            await client.submit_many([job])
            assert client.instance_of(job[0]) == "p0"  # new work goes to the prefill instance only
        seen = {rid: [] for rid, _, _ in jobs}
        await asyncio.wait_for(asyncio.gather(*(_collect(client, rid, seen[rid]) for rid in seen)), 120)
        await _at_baseline(client)
        return seen, records

    seen, records = asyncio.run(_with_client(pd_cluster, "least-load", body))
    for rid, _, _ in jobs:
        assert _tokens(seen[rid]) == reference[rid].outputs[0].token_ids
        assert seen[rid][-1].finished and seen[rid][-1].completions[0].finish_reason == "length"
    assert sorted(r.request_id for r in records if r.result.migrated) == sorted(rid for rid, _, _ in jobs)
    assert all(r.source == "p0" and r.destination == "d0" for r in records)


def test_a_decode_instance_short_of_room_leaves_requests_parked_and_loses_nothing(pd_cluster):
    # 64 blocks of 16 tokens per instance; each request grows to 260 + 40 tokens = 19 blocks, so the
    # decode instance holds three at a time and the rest wait, parked, on the prefill instance.
    jobs = _jobs(6, prompt_len=260, prefix="room-")
    reference = _run_offline(LLMEngine(TINY_CONFIG), jobs)

    async def body(client: ClusterClient):
        most_parked = 0
        records: list[HandOffRecord] = []
        client.handoffs.listeners.append(records.append)
        await client.submit_many(jobs)
        seen = {rid: [] for rid, _, _ in jobs}
        readers = asyncio.gather(*(_collect(client, rid, seen[rid]) for rid in seen))
        while not readers.done():
            most_parked = max(most_parked, client.loads().get("p0").num_parked if client.loads() else 0)
            await asyncio.sleep(0.02)
        await readers
        await _at_baseline(client)
        return seen, records, most_parked

    seen, records, most_parked = asyncio.run(_with_client(pd_cluster, "least-load", body))
    for rid, _, _ in jobs:
        assert _tokens(seen[rid]) == reference[rid].outputs[0].token_ids
    assert most_parked >= 2  # requests waited on the prefill side for the decode side to have room
    assert len([r for r in records if r.result.migrated]) == len(jobs)
    assert max(r.wait_s for r in records) > 0.05


@pytest.mark.parametrize("point", ["parked", "pulling", "decoding"])
def test_a_client_leaving_at_any_point_leaves_both_instances_at_baseline(pd_cluster, point: str):
    async def body(client: ClusterClient):
        if point in ("parked", "pulling"):
            client.handoffs.max_pulls = 0  # no decode instance takes anything: it stays parked
        ((request_id, prompt, params),) = _jobs(1, prompt_len=200, prefix=f"gone-{point}-")
        await client.submit_many([(request_id, prompt, params)])
        seen: list[RequestDelta] = []
        reader = asyncio.create_task(_collect(client, request_id, seen))
        if point in ("parked", "pulling"):
            await _wait_for(lambda: bool(client.handoffs.queue), what="the request parked")
        if point == "pulling":
            client.handoffs.max_pulls = 2
            client.handoffs.assign()  # the pull starts now; the abort below races it
            assert client.handoffs.pulls["d0"] == 1
        elif point == "decoding":
            await _wait_for(
                lambda: client.instance_of(request_id) == "d0" and len(_tokens(seen)) >= 3, what="decoding"
            )
        reader.cancel()  # the client disconnects
        await asyncio.gather(reader, return_exceptions=True)
        client.handoffs.max_pulls = 2
        await _wait_for(lambda: not client.migrator.moving, what="the pull ended")
        await _at_baseline(client)
        assert not client.handoffs.queue and not client.handoffs.pulls.get("d0")

    asyncio.run(_with_client(pd_cluster, "least-load", body))


def test_with_no_decode_instance_left_the_prefill_instance_decodes_what_it_parks(ray_session):
    jobs = _jobs(3)
    reference = _run_offline(LLMEngine(TINY_CONFIG), jobs)

    async def body(client: ClusterClient):
        await client.retire("d0")  # the only decode instance goes away
        await client.submit_many(jobs)
        seen = {rid: [] for rid, _, _ in jobs}
        await asyncio.wait_for(asyncio.gather(*(_collect(client, rid, seen[rid]) for rid in seen)), 120)
        return seen

    seen = _run_on_fresh_cluster(body)
    for rid, _, _ in jobs:
        assert _tokens(seen[rid]) == reference[rid].outputs[0].token_ids


def test_requests_parked_on_a_prefill_instance_that_dies_resume_on_the_decode_instance(ray_session):
    jobs = _jobs(2)
    reference = _run_offline(LLMEngine(TINY_CONFIG), jobs)

    async def body(client: ClusterClient):
        client.handoffs.max_pulls = 0  # they stay parked on p0
        await client.submit_many(jobs)
        seen = {rid: [] for rid, _, _ in jobs}
        readers = asyncio.gather(*(_collect(client, rid, seen[rid]) for rid in seen))
        await _wait_for(lambda: len(client.handoffs.queue) == 2, what="both parked")
        await client.retire("p0")  # the only prefill instance goes, with their KV
        await asyncio.wait_for(readers, 120)
        # Failover resubmitted them (prompt + the first token) to the decode instance, which runs
        # them whole; a new request goes there too.
        assert all(client.instance_of(rid) is None for rid in seen)
        late = [("late", *jobs[0][1:])]
        await client.submit_many(late)
        assert client.instance_of("late") == "d0"
        seen["late"] = []
        await asyncio.wait_for(_collect(client, "late", seen["late"]), 60)
        return seen

    seen = _run_on_fresh_cluster(body)
    for rid, _, _ in jobs:
        assert _tokens(seen[rid]) == reference[rid].outputs[0].token_ids
    assert _tokens(seen["late"]) == reference["r0"].outputs[0].token_ids
