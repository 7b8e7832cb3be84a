"""SimExecutor: a model runner with no model. It keeps the per-request state the real runner keeps,
from the scheduler's diff-style output (checking that the two agree), "computes" the scheduled
slices, samples a fixed token where a slice reaches the end of a request's known tokens, and, with a
cost model, says how long the real step would have taken.

It is the scheduler's executor in the simulator and in the scheduler's unit tests alike, so the two
exercise one contract. Plain Python: no torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from sutra.core.output import RunnerOutput, SchedulerOutput


class StepCost(Protocol):
    """What prices a step: seconds for a batch of (cached context, new tokens) slices."""

    def step_seconds(self, slices: Iterable[tuple[int, int]]) -> float: ...


class SimExecutor:
    def __init__(self, token: int = 7, cost_model: StepCost | None = None, keep_steps: bool = True) -> None:
        self.token = token
        self.cost_model = cost_model  # None: steps take no time
        self.keep_steps = keep_steps  # keep every SchedulerOutput (tests read them; long runs should not)
        self.state: dict[str, list] = {}
        self.steps: list[SchedulerOutput] = []
        self.last_step_seconds = 0.0

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        if self.keep_steps:
            self.steps.append(out)
        state = self.state
        for rid in out.finished_request_ids + out.preempted_request_ids:
            state.pop(rid, None)
        for new in out.new_requests:
            if new.request_id in state:
                raise RuntimeError(f"request {new.request_id} is new to the executor twice")
            # [known tokens, tokens computed, block ids]: all a runner keeps that the checks need.
            state[new.request_id] = [len(new.token_ids), new.num_computed_tokens, list(new.block_ids)]
        for cached in out.cached_requests:
            st = state[cached.request_id]
            if st[1] != cached.num_computed_tokens:
                raise RuntimeError(f"executor and scheduler disagree on request {cached.request_id}")
            if cached.new_block_ids:
                st[2].extend(cached.new_block_ids)
        slices = []
        sampled = {}
        token = self.token
        for rid, n in out.num_scheduled_tokens.items():
            st = state[rid]
            computed = st[1]
            slices.append((computed, n))
            computed = st[1] = computed + n
            if computed >= st[0]:
                if computed > st[0]:
                    raise RuntimeError(f"request {rid} was scheduled past its known tokens")
                st[0] += 1
                sampled[rid] = token
        self.last_step_seconds = self.cost_model.step_seconds(slices) if self.cost_model and slices else 0.0
        return RunnerOutput(sampled_token_ids=sampled)
