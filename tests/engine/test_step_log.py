"""The step log of a served engine (`sutra serve --step-log`): every step's slices add up to the work
the requests needed, each step's cycle covers its engine step, and a reader skips a line cut short."""

from __future__ import annotations

import asyncio
import json

import pytest

from sutra.config import CacheConfig, EngineConfig, ModelConfig
from sutra.engine.async_engine import AsyncEngine
from sutra.engine.engine import LLMEngine
from sutra.engine.step_log import StepLog, read_step_log
from sutra.sampling_params import SamplingParams


def test_logged_steps_hold_every_token_the_requests_computed(tmp_path):
    config = EngineConfig(
        ModelConfig(model="random:tiny-llama"), CacheConfig(num_blocks=64, enable_prefix_caching=False)
    )
    prompts = {"a": list(range(100, 140)), "b": list(range(200, 210)), "c": list(range(300, 317))}
    max_tokens = 6
    path = tmp_path / "steps.jsonl"

    async def main():
        engine = AsyncEngine(LLMEngine(config))
        engine.log_steps(StepLog(path))
        engine.start()
        try:
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)

            async def one(rid):
                return [d async for d in engine.generate(rid, prompts[rid], params)]

            await asyncio.gather(*(one(rid) for rid in prompts))
            await asyncio.sleep(0.1)  # an idle wait: excluded from the last step's cycle
            await one("a")  # once more, alone
        finally:
            await engine.shutdown()

    asyncio.run(main())
    records = [json.loads(line) for line in path.read_text().splitlines()]
    # Every prompt token and every sampled token but the last is computed once, in some step.
    expected = sum(len(p) + max_tokens - 1 for p in prompts.values()) + len(prompts["a"]) + max_tokens - 1
    assert sum(n for r in records for _, n in r["slices"]) == expected
    assert all("cycle_s" in r for r in records[:-1]) and "cycle_s" not in records[-1]
    starts = [r["t"] for r in records]
    assert starts == sorted(starts) and starts[-1] - starts[0] >= 0.1  # the idle wait lies between
    for r in records[:-1]:
        assert r["cycle_s"] >= r["step_s"] * 0.999 and r["cycle_s"] < 0.1  # the idle 0.1 s left out
    assert len(read_step_log(path)) == len(records) - 1


def test_a_reader_skips_a_line_cut_short_and_lines_stop_at_the_bound(tmp_path):
    path = tmp_path / "steps.jsonl"
    path.write_text('{"slices":[[0,4]],"step_s":0.01,"cycle_s":0.02}\n{"slices":[[4,1]],"st')
    assert read_step_log(path) == [([(0, 4)], 0.02)]
    log = StepLog(tmp_path / "bounded.jsonl", max_steps=2)
    for k in range(5):
        log.step_started()
        log.step_ended([(k, 1)], 0.001)
    log.close()
    assert len((tmp_path / "bounded.jsonl").read_text().splitlines()) == 2
    with pytest.raises(ValueError, match="at least one step"):
        StepLog(tmp_path / "none.jsonl", max_steps=0)
