"""AsyncEngine: deltas, stop-string hold-back, aborts, the waiting bound, and surviving a failed step.
A tiny random model keeps these fast; what they test is the loop, not the text."""

from __future__ import annotations

import asyncio

import pytest

from sutra.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from sutra.core.request import RequestSpec
from sutra.engine.async_engine import IDLE_POLL_S, AsyncEngine
from sutra.engine.client import EngineDeadError, EngineDrainingError, EngineOverloadedError
from sutra.engine.engine import LLMEngine
from sutra.engine.engine_stream import EngineStream, stop_holdback
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
    stream = EngineStream(
        queue=asyncio.Queue(),
        spec=RequestSpec(),
        prompt_token_ids=[5],
        arrival_time=0.0,
        admitted=admitted,
        params=params,
        sent_text=[0],
        sent_tokens=[0],
        holdback=stop_holdback(params),
    )
    assert stream.holdback == len("\n\nUser") - 1
    completion = CompletionOutput(index=0, text="Hello\n\nUs", token_ids=[1, 2, 3])
    out = RequestOutput("r", None, [5], [completion], RequestMetrics(arrival_time=0.0))
    first = stream.next_delta(out).completions[0]
    assert first.text == "Hell" and first.token_ids == [1, 2, 3]  # "o\n\nUs" might become the stop
    completion.text, completion.finish_reason = "Hello\n\nUsual", "length"
    assert stream.next_delta(out).completions[0].text == "o\n\nUsual"


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
        await aengine.submit(
            "x", [1, 2, 3], SamplingParams(max_tokens=1)
        )  # loop not started: it stays waiting
        with pytest.raises(EngineOverloadedError, match="limit 1"):
            await aengine.submit("y", [1, 2, 3], SamplingParams(max_tokens=1))
        aengine.abort("x")
        await aengine.shutdown()

    _run(main())


def test_submit_many_queues_all_or_none(engine):
    async def main():
        aengine = AsyncEngine(engine, max_waiting_requests=3)
        one = SamplingParams(max_tokens=1)
        await aengine.submit("x", [1, 2, 3], one)  # loop not started: it stays waiting
        with pytest.raises(EngineOverloadedError, match="limit 3"):
            await aengine.submit_many([("a", [4], one), ("b", [5], one), ("c", [6], one)])
        with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
            await aengine.submit_many([("a", [4], one), ("b", [engine.arch.vocab_size], one)])
        assert aengine.num_waiting == 1
        await aengine.submit_many([("a", [4], one), ("b", [5], one)])
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


# ---- no single event stops the loop ------------------------------------------------------------
# A hang would be the failure here, so every wait is bounded: a stuck loop fails the test, not the suite.
LOOP_TIMEOUT_S = 30.0


async def _collect_bounded(aengine: AsyncEngine, rid: str, prompt: list[int], params: SamplingParams):
    return await asyncio.wait_for(_collect(aengine, rid, prompt, params), LOOP_TIMEOUT_S)


class _CountingListener:
    def __init__(self) -> None:
        self.steps = 0
        self.aborts: list[str] = []

    def on_step(self, engine: AsyncEngine, outputs) -> None:
        self.steps += 1

    def on_abort(self, engine: AsyncEngine, request_id: str) -> None:
        self.aborts.append(request_id)


class _FailingListener:
    def on_step(self, engine: AsyncEngine, outputs) -> None:
        raise RuntimeError("listener bug")

    def on_abort(self, engine: AsyncEngine, request_id: str) -> None:
        raise RuntimeError("listener bug")


class _LoopKiller(BaseException):
    """Not an Exception: no guard inside the loop catches it, so the loop itself ends."""


class _KillingListener:
    def on_step(self, engine: AsyncEngine, outputs) -> None:
        raise _LoopKiller("the loop is gone")

    def on_abort(self, engine: AsyncEngine, request_id: str) -> None:
        pass


def test_a_failing_listener_is_skipped_and_the_others_still_hear(engine):
    params = SamplingParams(max_tokens=6, ignore_eos=True)

    async def main():
        aengine = AsyncEngine(engine)
        counting = _CountingListener()
        aengine.listeners += [_FailingListener(), counting]
        aengine.start()
        try:
            deltas = await _collect_bounded(aengine, "a", list(range(10)), params)
            await aengine.submit("b", list(range(10)), SamplingParams(max_tokens=500, ignore_eos=True))
            aengine.abort("b")  # the failing on_abort must not reach the caller
            more = await _collect_bounded(aengine, "c", list(range(10)), params)
            return deltas, more, counting
        finally:
            await aengine.shutdown()

    deltas, more, counting = _run(main())
    assert sum(len(d.completions[0].token_ids) for d in deltas) == 6 and deltas[-1].finished
    assert sum(len(d.completions[0].token_ids) for d in more) == 6
    assert counting.steps >= 12 and counting.aborts == ["b"]
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks


def test_when_the_loop_dies_every_waiter_errors_at_once_and_the_engine_says_so(engine):
    params = SamplingParams(max_tokens=50, ignore_eos=True)

    async def main():
        aengine = AsyncEngine(engine)
        aengine.listeners.append(_KillingListener())
        aengine.start()
        try:
            await aengine.submit("x", list(range(10)), params)
            await aengine.submit("y", list(range(20)), params)
            results = await asyncio.wait_for(
                asyncio.gather(
                    _drain(aengine, "x"),
                    _drain(aengine, "y"),
                    return_exceptions=True,
                ),
                LOOP_TIMEOUT_S,
            )
            with pytest.raises(EngineDeadError, match="loop stopped"):
                await aengine.submit("z", list(range(10)), params)
            return results, aengine.dead_reason
        finally:
            await aengine.shutdown()
            for rid in ("x", "y"):  # the dead loop never handed these back to the engine
                engine.abort_request(rid)

    results, reason = _run(main())
    assert all(isinstance(r, EngineDeadError) for r in results), results
    assert "_LoopKiller: the loop is gone" in reason


async def _drain(aengine: AsyncEngine, rid: str) -> list:
    return [d async for d in aengine.stream(rid)]


def test_shutdown_ends_every_waiting_stream(engine):
    async def main():
        aengine = AsyncEngine(engine)
        aengine.start()
        await aengine.submit("long", list(range(10)), SamplingParams(max_tokens=1000, ignore_eos=True))
        reader = asyncio.create_task(_drain(aengine, "long"))
        await asyncio.sleep(0.2)
        await aengine.shutdown()
        with pytest.raises(EngineDeadError, match="shut down"):
            await asyncio.wait_for(reader, LOOP_TIMEOUT_S)
        assert aengine.dead_reason == "the engine has shut down"
        engine.abort_request("long")

    _run(main())


def test_a_failing_add_fails_that_request_alone(engine, monkeypatch):
    real_add = engine.add_request

    def add(request_id, *args, **kwargs):
        if request_id == "bad":
            raise RuntimeError("cannot add this one")
        return real_add(request_id, *args, **kwargs)

    monkeypatch.setattr(engine, "add_request", add)
    params = SamplingParams(max_tokens=4, ignore_eos=True)

    async def main():
        aengine = AsyncEngine(engine)
        aengine.start()
        try:
            await aengine.submit("bad", list(range(10)), params)
            await aengine.submit("good", list(range(10)), params)
            # As a server handler does: wait for the engine to take it, then read the stream.
            assert await asyncio.wait_for(aengine.estimated_finish("bad"), LOOP_TIMEOUT_S) is None
            with pytest.raises(RuntimeError, match="cannot add this one"):
                await asyncio.wait_for(_drain(aengine, "bad"), LOOP_TIMEOUT_S)
            return await asyncio.wait_for(_drain(aengine, "good"), LOOP_TIMEOUT_S)
        finally:
            await aengine.shutdown()

    deltas = _run(main())
    assert sum(len(d.completions[0].token_ids) for d in deltas) == 4 and deltas[-1].finished
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks


def test_a_failing_delta_fails_that_request_alone(engine, monkeypatch):
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    real_delta = EngineStream.next_delta

    def delta(stream, out):
        if out.request_id == "bad" and stream.sent_tokens[0] >= 2:
            raise RuntimeError("delta bug")
        return real_delta(stream, out)

    monkeypatch.setattr(EngineStream, "next_delta", delta)

    async def main():
        aengine = AsyncEngine(engine)
        aengine.start()
        try:
            await aengine.submit("bad", list(range(10)), params)
            good = asyncio.create_task(_collect_bounded(aengine, "good", list(range(30)), params))
            with pytest.raises(EngineDeadError, match="delta bug"):
                await asyncio.wait_for(_drain(aengine, "bad"), LOOP_TIMEOUT_S)
            deltas = await good
            for _ in range(100):  # the failed request's abort is applied between steps
                if not engine.has_unfinished_requests():
                    break
                await asyncio.sleep(0.01)
            return deltas
        finally:
            await aengine.shutdown()

    deltas = _run(main())
    assert sum(len(d.completions[0].token_ids) for d in deltas) == 8 and deltas[-1].finished
    assert not engine.has_unfinished_requests()
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks


def test_a_failing_abort_does_not_stop_the_loop(engine, monkeypatch):
    real_abort = engine.abort_request
    calls = {"n": 0}

    def abort(request_id):
        calls["n"] += 1
        real_abort(request_id)
        if calls["n"] == 1:
            raise RuntimeError("abort bug")

    monkeypatch.setattr(engine, "abort_request", abort)
    params = SamplingParams(max_tokens=4, ignore_eos=True)

    async def main():
        aengine = AsyncEngine(engine)
        aengine.start()
        try:
            await aengine.submit("gone", list(range(10)), SamplingParams(max_tokens=500, ignore_eos=True))
            await asyncio.wait_for(aengine.estimated_finish("gone"), LOOP_TIMEOUT_S)
            aengine.abort("gone")
            return await _collect_bounded(aengine, "next", list(range(10)), params)
        finally:
            await aengine.shutdown()

    deltas = _run(main())
    assert calls["n"] == 1
    assert sum(len(d.completions[0].token_ids) for d in deltas) == 4
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks


# ---- limits, draining, idling -------------------------------------------------------------------
def test_a_batch_larger_than_the_waiting_bound_is_invalid_not_overloaded(engine):
    async def main():
        aengine = AsyncEngine(engine, max_waiting_requests=3)
        one = SamplingParams(max_tokens=1)
        # Even into an empty queue it could never fit: retrying is no use, so it is the request's error.
        with pytest.raises(InvalidRequestError, match="has 4 prompts but the server queues at most 3") as e:
            await aengine.submit_many([(f"r{i}", [4], one) for i in range(4)])
        assert e.value.param == "prompt"
        assert aengine.num_waiting == 0
        await aengine.shutdown()

    _run(main())


def test_draining_refuses_new_requests_and_abort_all_ends_the_rest(engine):
    async def main():
        aengine = AsyncEngine(engine)
        aengine.start()
        try:
            await aengine.submit("long", list(range(10)), SamplingParams(max_tokens=1000, ignore_eos=True))
            reader = asyncio.create_task(_drain(aengine, "long"))
            await asyncio.wait_for(aengine.estimated_finish("long"), LOOP_TIMEOUT_S)
            aengine.begin_drain()
            assert aengine.is_draining and aengine.num_in_flight == 1
            with pytest.raises(EngineDrainingError, match="shutting down"):
                await aengine.submit("new", list(range(10)), SamplingParams(max_tokens=1))
            assert aengine.abort_all(EngineDrainingError("out of time")) == 1
            with pytest.raises(EngineDrainingError, match="out of time"):
                await asyncio.wait_for(reader, LOOP_TIMEOUT_S)
            for _ in range(100):  # the abort is applied between steps
                if not engine.has_unfinished_requests():
                    break
                await asyncio.sleep(0.01)
            assert aengine.num_in_flight == 0
        finally:
            await aengine.shutdown()

    _run(main())
    assert not engine.has_unfinished_requests()
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks


def test_a_step_that_schedules_nothing_waits_instead_of_spinning():
    config = EngineConfig(
        ModelConfig(model="random:tiny-llama"),
        CacheConfig(num_blocks=64),
        SchedulerConfig(policy="rpm", rpm_limit=1),
    )
    rpm_engine = LLMEngine(config)
    real_step = rpm_engine.step
    steps = {"n": 0}

    def counting_step():
        steps["n"] += 1
        return real_step()

    rpm_engine.step = counting_step

    async def main():
        aengine = AsyncEngine(rpm_engine)
        aengine.start()
        try:
            one = SamplingParams(max_tokens=2, ignore_eos=True)
            await _collect_bounded(aengine, "first", list(range(10)), one)
            await aengine.submit("throttled", list(range(10)), one)  # same client: over 1 per minute
            await asyncio.sleep(0.2)
            before = steps["n"]
            await asyncio.sleep(1.0)
            throttled_steps = steps["n"] - before
            aengine.abort("throttled")
            return throttled_steps
        finally:
            await aengine.shutdown()

    # One step per poll interval (0.05 s), not one after another as fast as a core allows.
    assert _run(main()) <= 1.0 / IDLE_POLL_S + 5
