"""AsyncEngine: deltas, stop-string hold-back, aborts, the waiting bound, and surviving a failed step.
A tiny random model keeps these fast; what they test is the loop, not the text."""

from __future__ import annotations

import asyncio

import pytest

from sutra.config import CacheConfig, EngineConfig, ModelConfig
from sutra.engine.async_engine import AsyncEngine, EngineDeadError, EngineOverloadedError, _Stream
from sutra.engine.engine import LLMEngine
from sutra.errors import InvalidRequestError
from sutra.outputs import CompletionOutput, RequestMetrics, RequestOutput
from sutra.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(EngineConfig(ModelConfig(model="random:tiny-llama"), CacheConfig(num_blocks=64)))


def _run(coro):
    return asyncio.run(coro)


async def _collect(aengine: AsyncEngine, rid: str, prompt: list[int], params: SamplingParams):
    return [delta async for delta in aengine.generate(rid, prompt, params)]


def test_deltas_add_up_to_the_offline_result(engine):
    params = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.7, seed=3, n=2)
    prompt = list(range(100, 130))

    async def main():
        aengine = AsyncEngine(engine)
        aengine.start()
        try:
            return await _collect(aengine, "a", prompt, params)
        finally:
            await aengine.shutdown()

    deltas = _run(main())
    assert deltas[-1].finished and all(not d.finished for d in deltas[:-1])
    engine.add_request("offline", prompt, params)
    offline = None
    while engine.has_unfinished_requests():
        offline = next((o for o in engine.step() if o.request_id == "offline"), offline)
    for i in range(2):
        tokens = [t for d in deltas for t in d.completions[i].token_ids]
        text = "".join(d.completions[i].text for d in deltas)
        assert tokens == offline.outputs[i].token_ids and len(tokens) == 12
        assert text == offline.outputs[i].text
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks


def test_text_that_may_start_a_stop_string_is_held_back():
    params = SamplingParams(stop=["\n\nUser"])
    admitted = asyncio.new_event_loop().create_future()
    stream = _Stream(asyncio.Queue(), params, None, [0], [0], len("\n\nUser") - 1, admitted)
    completion = CompletionOutput(index=0, text="Hello\n\nUs", token_ids=[1, 2, 3])
    out = RequestOutput("r", None, [5], [completion], RequestMetrics(arrival_time=0.0))
    first = AsyncEngine._delta(out, stream).completions[0]
    assert first.text == "Hell" and first.token_ids == [1, 2, 3]  # "o\n\nUs" might become the stop
    completion.text, completion.finish_reason = "Hello\n\nUsual", "length"
    assert AsyncEngine._delta(out, stream).completions[0].text == "o\n\nUsual"


def test_abort_ends_the_stream_and_frees_blocks(engine):
    async def main():
        aengine = AsyncEngine(engine)
        aengine.start()
        got = []
        try:
            async for delta in aengine.generate(
                "long", list(range(50)), SamplingParams(max_tokens=500, ignore_eos=True)
            ):
                got.append(delta)
                if len(got) == 3:
                    aengine.abort("long")
            for _ in range(100):  # the abort is applied between steps
                if not engine.has_unfinished_requests():
                    break
                await asyncio.sleep(0.01)
        finally:
            await aengine.shutdown()
        return got

    got = _run(main())
    assert len(got) == 3 and not got[-1].finished
    assert not engine.has_unfinished_requests()
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks


def test_waiting_bound_refuses_at_submit(engine):
    async def main():
        aengine = AsyncEngine(engine, max_waiting_requests=1)
        aengine.submit("x", [1, 2, 3], SamplingParams(max_tokens=1))  # loop not started: it stays waiting
        with pytest.raises(EngineOverloadedError, match="limit 1"):
            aengine.submit("y", [1, 2, 3], SamplingParams(max_tokens=1))
        aengine.abort("x")
        await aengine.shutdown()

    _run(main())


def test_submit_many_queues_all_or_none(engine):
    async def main():
        aengine = AsyncEngine(engine, max_waiting_requests=3)
        one = SamplingParams(max_tokens=1)
        aengine.submit("x", [1, 2, 3], one)  # loop not started: it stays waiting
        with pytest.raises(EngineOverloadedError, match="limit 3"):
            aengine.submit_many([("a", [4], one), ("b", [5], one), ("c", [6], one)])
        with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
            aengine.submit_many([("a", [4], one), ("b", [engine.arch.vocab_size], one)])
        assert aengine.num_waiting == 1
        aengine.submit_many([("a", [4], one), ("b", [5], one)])
        assert aengine.num_waiting == 3
        for rid in ("x", "a", "b"):
            aengine.abort(rid)
        await aengine.shutdown()

    _run(main())


def test_a_failed_step_fails_its_requests_and_the_engine_serves_on(engine, monkeypatch):
    real_step = engine.step
    calls = {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real_step()

    monkeypatch.setattr(engine, "step", flaky_step)

    async def main():
        aengine = AsyncEngine(engine)
        aengine.start()
        try:
            with pytest.raises(EngineDeadError, match="boom"):
                await _collect(
                    aengine, "doomed", list(range(20)), SamplingParams(max_tokens=8, ignore_eos=True)
                )
            return await _collect(
                aengine, "fine", list(range(20)), SamplingParams(max_tokens=8, ignore_eos=True)
            )
        finally:
            await aengine.shutdown()

    deltas = _run(main())
    assert sum(len(d.completions[0].token_ids) for d in deltas) == 8
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks
