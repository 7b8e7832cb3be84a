"""ClusterClient over two Ray instances of the tiny random model: the same outputs as one local engine,
dispatch as the policy says, aborts that free blocks where the request ran, and user errors raised as
the instance raised them."""

from __future__ import annotations

import asyncio
import time

import pytest

from sutra.cluster.client import ClusterClient
from sutra.cluster.dispatch import RoundRobinPolicy
from sutra.core.request import RequestSpec
from sutra.engine.client import RequestDelta
from sutra.engine.engine import LLMEngine
from sutra.errors import InvalidRequestError
from sutra.outputs import RequestOutput
from sutra.sampling_params import SamplingParams
from sutra.structured.compiler import compiler_for
from tests.cluster.conftest import TINY_CONFIG

pytestmark = pytest.mark.ray


async def _with_client(cluster, dispatch, body):
    client = cluster.client(dispatch, load_refresh_s=0.05)
    client.start()
    try:
        return await body(client)
    finally:
        await client.shutdown()


async def _wait_for(condition, timeout_s: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout_s} s")
        await asyncio.sleep(0.02)


class _Recorder:
    def __init__(self) -> None:
        self.deltas: list[RequestDelta] = []
        self.aborted: list[str] = []

    def on_step(self, engine, deltas) -> None:
        self.deltas.extend(deltas)

    def on_abort(self, engine, request_id) -> None:
        self.aborted.append(request_id)


def _run_offline(engine: LLMEngine, jobs) -> dict[str, RequestOutput]:
    for request_id, prompt, params in jobs:
        engine.add_request(request_id, prompt, params)
    finished = {}
    while engine.has_unfinished_requests():
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
    return finished


def test_concurrent_requests_match_one_local_engine(two_instances):
    greedy = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0)
    seeded = SamplingParams(max_tokens=10, ignore_eos=True, temperature=0.8, seed=7, n=2)
    jobs = [(f"r{i}", list(range(100 + 7 * i, 130 + 11 * i)), greedy) for i in range(6)]
    jobs.append(("seeded", list(range(300, 340)), seeded))
    recorder = _Recorder()

    async def body(client: ClusterClient):
        client.listeners.append(recorder)

        async def run(request_id, prompt, params):
            await client.submit_many([(request_id, prompt, params)], RequestSpec(client="tenant-a"))
            owner = client.instance_of(request_id)
            assert client.request_info(request_id).prompt_token_ids == prompt
            deltas = [d async for d in client.stream(request_id)]
            return owner, deltas

        results = await asyncio.gather(*(run(*job) for job in jobs))
        assert client.num_in_flight == 0
        return results

    results = asyncio.run(_with_client(two_instances, "round-robin", body))
    assert {owner for owner, _ in results} == {"i0", "i1"}

    finished = _run_offline(LLMEngine(TINY_CONFIG), jobs)
    for (request_id, _, params), (_, deltas) in zip(jobs, results, strict=True):
        assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
        for i in range(params.n):
            expected = finished[request_id].outputs[i]
            tokens = [t for d in deltas for t in d.completions[i].token_ids]
            assert tokens == expected.token_ids and len(tokens) == params.max_tokens
            assert "".join(d.completions[i].text for d in deltas) == expected.text
    # Listeners saw every delta as it arrived.
    assert sum(len(deltas) for _, deltas in results) == len(recorder.deltas)
    assert recorder.aborted == []


def test_round_robin_alternates(two_instances):
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    chosen: list[str] = []

    class Recording(RoundRobinPolicy):
        def _pick(self, loads, request):
            chosen.append(super()._pick(loads, request))
            return chosen[-1]

    async def body(client: ClusterClient):
        for i in range(4):
            await client.submit_many([(f"rr{i}", [5, 6, 7, 8], params)])
            assert [d async for d in client.stream(f"rr{i}")][-1].finished

    asyncio.run(_with_client(two_instances, Recording(), body))
    assert chosen == ["i0", "i1", "i0", "i1"]


def test_least_load_sends_to_the_freer_instance(two_instances):
    params = SamplingParams(max_tokens=600, ignore_eos=True)  # long enough to outlast the test

    async def body(client: ClusterClient):
        # Equal (idle) loads: the tie goes to i0, which then holds a long prompt.
        await client.submit_many([("big", list(range(1, 301)), params)])
        assert client.instance_of("big") == "i0"
        await _wait_for(lambda: client.loads()["i0"].num_running == 1, what="i0's load shows the request")
        owners = []
        for i in range(2):  # i1 stays freer even with these pending on it
            await client.submit_many([(f"small{i}", [1, 2, 3], params)])
            owners.append(client.instance_of(f"small{i}"))
        for request_id in ("big", "small0", "small1"):
            client.abort(request_id)
        return owners

    assert asyncio.run(_with_client(two_instances, "least-load", body)) == ["i1", "i1"]


def test_abort_frees_the_blocks_on_the_owning_instance(two_instances):
    actors = two_instances.actors
    recorder = _Recorder()

    async def body(client: ClusterClient):
        client.listeners.append(recorder)

        def idle() -> bool:
            stats = client.stats()
            return stats.kv_free_blocks == 2 * 64 and stats.num_running == 0

        await _wait_for(idle, what="both instances idle")
        params = SamplingParams(max_tokens=900, ignore_eos=True)
        await client.submit_many([("doomed", list(range(10, 90)), params)])
        owner = client.instance_of("doomed")
        got = []
        async for delta in client.stream("doomed"):
            got.append(delta)
            if len(got) == 3:
                client.abort("doomed")
        # Deltas routed before the abort may still be read; then the stream ends, unfinished.
        assert 3 <= len(got) < 900 and not got[-1].finished
        assert client.num_in_flight == 0 and client.request_info("doomed") is None
        deadline = time.monotonic() + 20
        while True:  # the abort is applied between the instance's steps
            stats = await asyncio.wait_for(actors[owner].stats.remote(), 30)
            if stats.num_running == 0 and stats.kv_free_blocks == stats.kv_total_blocks:
                break
            assert time.monotonic() < deadline, f"{owner} still holds blocks: {stats}"
            await asyncio.sleep(0.02)
        # The client's summed stats follow within a load refresh.
        await _wait_for(idle, what="the client's stats back to baseline")

    asyncio.run(_with_client(two_instances, "least-load", body))
    assert recorder.aborted == ["doomed"]


def test_user_errors_are_raised_as_the_instance_raised_them(two_instances):
    async def body(client: ClusterClient):
        vocab = client.tokenizer.vocab_size
        ok = SamplingParams(max_tokens=1)
        with pytest.raises(InvalidRequestError, match="outside the vocabulary") as error:
            await client.submit_many([("fine", [1, 2], ok), ("bad", [vocab + 5], ok)])
        assert error.value.param == "prompt"
        assert client.num_in_flight == 0  # all or none
        with pytest.raises(ValueError, match="already in use"):
            await client.submit_many([("twice", [1], ok), ("twice", [2], ok)])
        # The front end tokenizes with the instances' tokenizer.
        assert await client.encode("Hello") == client.tokenizer.encode("Hello")
        assert client.max_model_len == 2048 and client.max_request_tokens == 64 * 16

    asyncio.run(_with_client(two_instances, "least-load", body))


def test_the_front_end_compiles_specs_with_the_clusters_limits(two_instances):
    """The server compiles each spec in this process before dispatch (sutra/server/structured.py):
    its compiler for the instances' tokenizer has the config the instances were started with (that
    very object, not an equal default)."""
    assert compiler_for(two_instances.tokenizer).config is TINY_CONFIG.structured
