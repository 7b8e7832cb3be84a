"""Live migration between two serving engines (AsyncEngine) in one event loop, as the cluster runs it:
a reader that follows RequestMoved sees every token and character once, in order, and the same
output as an unmigrated run; a client leaving mid-move, a refusal, and a source that finished first
each end cleanly with no block held on either side. A tiny random model (two engines with the same
seed have the same weights) keeps these fast; parity with transformers is in test_migration.py."""

from __future__ import annotations

import asyncio

import pytest

from sutra.config import CacheConfig, EngineConfig, ModelConfig
from sutra.engine.async_engine import AsyncEngine
from sutra.engine.client import RequestDelta, RequestMoved
from sutra.engine.engine import LLMEngine
from sutra.engine.migration_endpoint import MigrationEndpoint, migrate
from sutra.sampling_params import SamplingParams

PROMPT = list(range(100, 160))
GREEDY = SamplingParams(max_tokens=80, ignore_eos=True, temperature=0.0, stop=["never-appears"])


def make_engine() -> LLMEngine:
    return LLMEngine(EngineConfig(ModelConfig(model="random:tiny-llama"), CacheConfig(num_blocks=64)))


@pytest.fixture(scope="module")
def engines() -> tuple[LLMEngine, LLMEngine]:
    return make_engine(), make_engine()


@pytest.fixture(scope="module")
def unmigrated(engines) -> tuple[list[int], str]:
    engine = engines[0]
    engine.add_request("reference", PROMPT, GREEDY)
    out = None
    while engine.has_unfinished_requests():
        out = next((o for o in engine.step() if o.request_id == "reference"), out)
    return out.outputs[0].token_ids, out.outputs[0].text


async def follow(
    aengines: dict[str, AsyncEngine], request_id: str, where: str, seen: list[RequestDelta]
) -> str:
    """Read a request's deltas wherever it goes; returns the instance it finished on."""
    while True:
        try:
            async for delta in aengines[where].stream(request_id):
                seen.append(delta)
            return where
        except RequestMoved as moved:
            where = moved.destination


def assert_at_baseline(*engines: LLMEngine) -> None:
    for engine in engines:
        assert not engine.has_unfinished_requests()
        assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks
        assert engine.kv.num_reserved_blocks == 0


async def until_tokens(seen: list[RequestDelta], n: int) -> None:
    while sum(len(d.completions[0].token_ids) for d in seen) < n:
        await asyncio.sleep(0.005)


def run_pair(engines, body):
    async def main():
        aengines = {"a": AsyncEngine(engines[0]), "b": AsyncEngine(engines[1])}
        for aengine in aengines.values():
            aengine.start()
        try:
            return await body(aengines)
        finally:
            for aengine in aengines.values():
                await aengine.shutdown()

    return asyncio.run(main())


def test_a_stream_across_a_live_migration_has_no_gap_or_duplicate(engines, unmigrated):
    async def body(aengines):
        await aengines["a"].submit("r", PROMPT, GREEDY)
        await aengines["a"].submit("mate", PROMPT[:20], SamplingParams(max_tokens=30, ignore_eos=True))
        mate: list[RequestDelta] = []
        mate_reader = asyncio.create_task(follow(aengines, "mate", "a", mate))
        seen: list[RequestDelta] = []
        reader = asyncio.create_task(follow(aengines, "r", "a", seen))
        await until_tokens(seen, 5)
        ends = {name: MigrationEndpoint(e) for name, e in aengines.items()}
        result = await migrate(ends["a"], ends["b"], "r", "m1", "b", last_stage_blocks=0)
        finished_on = await asyncio.wait_for(reader, 60)
        assert await asyncio.wait_for(mate_reader, 60) == "a" and mate[-1].finished
        return result, finished_on, seen

    result, finished_on, seen = run_pair(engines, body)
    assert result.migrated and finished_on == "b", result.reason
    assert result.stages >= 1 and result.bytes_copied > 0 and result.downtime_s > 0
    tokens = [t for d in seen for t in d.completions[0].token_ids]
    text = "".join(d.completions[0].text for d in seen)
    assert (tokens, text) == unmigrated
    assert seen[-1].finished and seen[-1].completions[0].finish_reason == "length"
    assert_at_baseline(*engines)


class _LeavesWhilePaused(MigrationEndpoint):
    """The request's client goes away right after the source paused it."""

    async def out_pause(self, migration_id):
        moved, blocks = await super().out_pause(migration_id)
        self.aengine.abort(moved.request_id)
        return moved, blocks


def test_a_client_leaving_mid_migration_leaves_both_engines_at_baseline(engines):
    async def body(aengines):
        await aengines["a"].submit("r", PROMPT, GREEDY)
        seen: list[RequestDelta] = []
        reader = asyncio.create_task(follow(aengines, "r", "a", seen))
        await until_tokens(seen, 3)
        result = await migrate(
            _LeavesWhilePaused(aengines["a"]),
            MigrationEndpoint(aengines["b"]),
            "r",
            "m2",
            "b",
            last_stage_blocks=0,
        )
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        for _ in range(100):  # the aborts are applied between steps
            if not any(e.engine.has_unfinished_requests() for e in aengines.values()):
                break
            await asyncio.sleep(0.02)
        return result

    result = run_pair(engines, body)
    assert not result.migrated
    assert "aborted by its client" in result.reason or "ended while paused" in result.reason
    assert_at_baseline(*engines)


def test_a_refused_migration_keeps_the_request_on_its_source(engines, unmigrated):
    async def body(aengines):
        engines[1].migration_target.inbox.min_free_blocks = engines[1].kv.pool.num_blocks
        try:
            await aengines["a"].submit("r", PROMPT, GREEDY)
            seen: list[RequestDelta] = []
            reader = asyncio.create_task(follow(aengines, "r", "a", seen))
            await until_tokens(seen, 3)
            ends = {name: MigrationEndpoint(e) for name, e in aengines.items()}
            result = await migrate(ends["a"], ends["b"], "r", "m3", "b", last_stage_blocks=0)
            return result, await asyncio.wait_for(reader, 60), seen
        finally:
            engines[1].migration_target.inbox.min_free_blocks = 0

    result, finished_on, seen = run_pair(engines, body)
    assert not result.migrated and "refused" in result.reason
    assert finished_on == "a"
    assert (
        [t for d in seen for t in d.completions[0].token_ids],
        "".join(d.completions[0].text for d in seen),
    ) == (unmigrated)
    assert_at_baseline(*engines)


def test_a_request_that_finished_first_is_not_moved(engines):
    async def body(aengines):
        await aengines["a"].submit("short", PROMPT, SamplingParams(max_tokens=2, ignore_eos=True))
        async for _ in aengines["a"].stream("short"):
            pass
        ends = {name: MigrationEndpoint(e) for name, e in aengines.items()}
        return await migrate(ends["a"], ends["b"], "short", "m4", "b")

    result = run_pair(engines, body)
    assert not result.migrated and "not a running" in result.reason
    assert_at_baseline(*engines)
