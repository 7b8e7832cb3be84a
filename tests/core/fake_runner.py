"""A fake model runner for scheduler tests: it 'computes' slices and samples a fixed token."""

from __future__ import annotations

import itertools

from sutra.config import SchedulerConfig
from sutra.core.kv_cache import KVCacheManager
from sutra.core.output import RunnerOutput, SchedulerOutput
from sutra.core.policies import Policy
from sutra.core.request import Request, RequestSpec
from sutra.core.scheduler import Scheduler
from sutra.sampling_params import SamplingParams

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


class FakeRunner:
    """Mirrors the real runner's contract: keeps per-request state from the diff-style output and
    samples (token 7, or the token given per request) when a slice reaches the end of known tokens."""

    def __init__(self, token: int = 7) -> None:
        self.token = token
        self.state: dict[str, dict] = {}
        self.steps: list[SchedulerOutput] = []

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        self.steps.append(out)
        for rid in out.finished_request_ids + out.preempted_request_ids:
            self.state.pop(rid, None)
        for new in out.new_requests:
            assert new.request_id not in self.state
            self.state[new.request_id] = {
                "tokens": list(new.token_ids),
                "computed": new.num_computed_tokens,
                "blocks": list(new.block_ids),
            }
        for cached in out.cached_requests:
            st = self.state[cached.request_id]
            assert st["computed"] == cached.num_computed_tokens
            st["blocks"].extend(cached.new_block_ids)
        result = RunnerOutput()
        for rid, n in out.num_scheduled_tokens.items():
            st = self.state[rid]
            st["computed"] += n
            assert st["computed"] <= len(st["tokens"])
            if st["computed"] == len(st["tokens"]):
                st["tokens"].append(self.token)
                result.sampled_token_ids[rid] = self.token
        return result


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
