"""Scheduler test helpers: requests, schedulers, and the simulator's executor as the model runner."""

from __future__ import annotations

import itertools

from sutra.config import SchedulerConfig
from sutra.core.kv_cache import KVCacheManager
from sutra.core.output import SchedulerOutput
from sutra.core.policies import Policy
from sutra.core.request import Request, RequestSpec
from sutra.core.scheduler import Scheduler
from sutra.sampling_params import SamplingParams
from sutra.sim.executor import SimExecutor

_ids = itertools.count()


def make_request(
    prompt_len: int = 8,
    max_tokens: int = 4,
    tokens: list[int] | None = None,
    client: str | None = None,
    priority: int = 0,
    cache_salt: str | None = None,
    **kw,
) -> Request:
    n = next(_ids)
    prompt = tokens if tokens is not None else [(n * 1000 + i) % 50_000 + 10 for i in range(prompt_len)]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    return Request(
        request_id=f"r{n}",
        prompt_token_ids=prompt,
        sampling_params=params,
        arrival_time=float(n),
        spec=RequestSpec(client=client, priority=priority, cache_salt=cache_salt),
        **kw,
    )


def make_scheduler(
    num_blocks: int = 1000,
    block_size: int = 16,
    budget: int = 512,
    max_seqs: int = 256,
    mode: str = "sarathi",
    prefix_caching: bool = True,
    max_model_len: int = 1 << 20,
    policy: str | Policy = "fcfs",
    **options,
) -> Scheduler:
    """`policy` is a registered name (built from the config, with `options` as SchedulerConfig
    fields) or a ready Policy (e.g. one given a test clock)."""
    kv = KVCacheManager(num_blocks, block_size, prefix_caching)
    name = policy if isinstance(policy, str) else "fcfs"
    cfg = SchedulerConfig(
        max_num_batched_tokens=budget, max_num_seqs=max_seqs, mode=mode, policy=name, **options
    )
    return Scheduler(cfg, kv, max_model_len=max_model_len, policy=None if isinstance(policy, str) else policy)


# The scheduler tests drive the simulator's executor: one runner contract for both.
FakeRunner = SimExecutor


def step(scheduler: Scheduler, runner: FakeRunner) -> SchedulerOutput:
    out = scheduler.schedule()
    scheduler.update_from_output(out, runner.execute(out))
    return out


def run_to_completion(scheduler: Scheduler, runner: FakeRunner, max_steps: int = 100_000) -> int:
    steps = 0
    while scheduler.has_unfinished_requests():
        step(scheduler, runner)
        steps += 1
        assert steps < max_steps, "scheduler made no progress"
    return steps
