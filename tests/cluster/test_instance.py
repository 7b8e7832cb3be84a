"""InstanceActor in-process (it is a plain class; Ray only hosts it): the long-poll outbox, what it
returns instead of raising, and that ClusterClient offers the EngineClient methods as AsyncEngine
does."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect

import pytest
import torch

from sutra.cluster.instance import InstanceActor
from sutra.cluster.messages import Update
from sutra.config import EngineConfig, ModelConfig, StructuredOutputsConfig
from sutra.engine.async_engine import AsyncEngine
from sutra.engine.client import EngineClient, EngineDrainingError
from sutra.errors import InvalidRequestError, ModelLoadError
from sutra.sampling_params import SamplingParams
from sutra.structured.params import StructuredOutputsParams
from tests.cluster.conftest import TINY_CONFIG


@pytest.fixture
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the actor sets them for its process: here, this one


async def _poll_until(actor: InstanceActor, ack: int, done) -> tuple[list[Update], int]:
    updates: list[Update] = []
    for _ in range(100):
        batch = await actor.poll(ack, 1.0)
        if batch:
            # Not acknowledged yet: the next poll returns them again first (a lost reply loses nothing).
            again = await actor.poll(ack, 1.0)
            assert [u.seq for u in again[: len(batch)]] == [u.seq for u in batch]
            updates += [u for u in batch if u.seq > ack]
            ack = batch[-1].seq
        if done(updates):
            return updates, ack
    raise AssertionError(f"never done: {updates}")


def test_outbox_orders_each_request_and_resends_until_acknowledged(keep_torch_threads):
    async def main():
        actor = InstanceActor("i7", TINY_CONFIG, num_threads=1)
        info = await actor.info()
        assert (info.instance_id, info.block_size, info.num_threads) == ("i7", 16, 1)
        assert info.max_request_tokens == 64 * 16
        params = SamplingParams(max_tokens=3, ignore_eos=True, temperature=0)
        assert await actor.submit_many([("a", [1, 2, 3], params)]) is None

        def finished(updates):
            return any(u.kind == "delta" and u.delta.finished for u in updates)

        updates, ack = await _poll_until(actor, 0, finished)
        assert [u.kind for u in updates][0] == "admitted" and updates[0].estimate is not None
        assert {u.kind for u in updates[1:]} == {"delta"}
        assert sum(len(u.delta.completions[0].token_ids) for u in updates[1:]) == 3
        assert await actor.poll(ack, 0.05) == []  # acknowledged: dropped; nothing new

        await actor.submit_many([("c", [4, 5, 6], SamplingParams(max_tokens=900, ignore_eos=True))])
        await actor.abort(["c"])
        updates, ack = await _poll_until(actor, ack, lambda us: any(u.kind == "ended" for u in us))
        assert {u.request_id for u in updates} == {"c"}
        report = await actor.report()
        assert report.num_in_flight == 0 and report.dead_reason is None
        assert report.stats.kv_free_blocks == report.stats.kv_total_blocks == 64

        await actor.begin_drain()
        assert (await actor.load()).draining
        refused = await actor.submit_many([("d", [1], SamplingParams(max_tokens=1))])
        assert isinstance(refused, EngineDrainingError)
        await actor.shutdown()

    asyncio.run(main())


def test_user_errors_are_returned_not_raised(keep_torch_threads):
    async def main():
        bad_model = EngineConfig(ModelConfig(model="/no/such/model.gguf"))
        assert isinstance(await InstanceActor("i0", bad_model, num_threads=1).info(), ModelLoadError)
        actor = InstanceActor("i1", TINY_CONFIG, num_threads=1)
        error = await actor.submit_many([("e", [], SamplingParams())])
        assert isinstance(error, InvalidRequestError) and error.param == "prompt"
        assert await actor.num_in_flight() == 0
        await actor.shutdown()

    asyncio.run(main())


def test_an_instance_compiles_specs_off_its_loop_with_the_configured_limits(keep_torch_threads):
    """The instance's compiler has the server's structured-output limits; it compiles each spec once
    (n prompts sharing one included), before the engine sees it, and refuses one over the limits."""
    config = dataclasses.replace(
        TINY_CONFIG, structured=StructuredOutputsConfig(max_spec_bytes=200, cache_size=3)
    )

    async def main():
        actor = InstanceActor("i0", config, num_threads=1)
        compiler = actor.engine.runner.structured
        assert compiler.config == config.structured
        spec = StructuredOutputsParams(choice=["yes", "no"])
        params = SamplingParams(max_tokens=4, temperature=0, structured_outputs=spec)
        assert await actor.submit_many([("a", [1, 2, 3], params), ("b", [4, 5], params)]) is None
        assert spec.cache_key() in compiler.cache and compiler.cache.misses == 1

        def finished(updates):
            done = {u.request_id for u in updates if u.kind == "delta" and u.delta.finished}
            return done == {"a", "b"}

        updates, _ = await _poll_until(actor, 0, finished)
        texts = {u.request_id: "" for u in updates}
        for u in updates:
            if u.kind == "delta":
                texts[u.request_id] += u.delta.completions[0].text
        assert set(texts.values()) <= {"yes", "no"}, texts
        big = StructuredOutputsParams(choice=["x" * 300])
        error = await actor.submit_many([("c", [1, 2], SamplingParams(max_tokens=2, structured_outputs=big))])
        assert isinstance(error, InvalidRequestError) and "over the limit of 200 bytes" in str(error)
        assert error.param == "structured_outputs"
        await actor.shutdown()

    asyncio.run(main())


def test_cluster_client_has_the_engine_client_methods_of_async_engine():
    pytest.importorskip("ray")
    from sutra.cluster.client import ClusterClient

    members = [n for n in vars(EngineClient) if not n.startswith("_")]
    assert {"submit_many", "stream", "abort", "stats", "dead_reason"} <= set(members)
    for name in members:
        ours, local = getattr(ClusterClient, name, None), getattr(AsyncEngine, name, None)
        assert type(ours) is type(local), name  # both methods, or both properties
        if inspect.isfunction(local):
            assert inspect.signature(ours) == inspect.signature(local), name
