"""The rules that shape one iteration's batch, in one place.

Two parts of the scheduler build batches: schedule() (for real, allocating KV) and its admission check
for preemption (a dry run: would the head of the queue start if these requests were gone?). They
differ in what they track, not in the rules, so the rules live here. (The simulator and the completion
estimator run the scheduler itself, so they follow these rules too.)

- slots: at most `max_num_seqs` running requests;
- budget: at most `max_num_batched_tokens` tokens per iteration;
- order: running decodes first (one token each), then partial prefills, then new requests;
- slices: a running request takes min(its uncomputed tokens, leftover budget); a new request's first
  slice depends on the mode (see `admission_slice`);
- prefill_first: an iteration that admits prompts runs only prompts; the decodes wait.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from sutra.config import SchedulerConfig, SchedulingMode
from sutra.core.request import Request

T = TypeVar("T")


@dataclass(frozen=True)
class BatchRules:
    max_num_batched_tokens: int
    max_num_seqs: int
    mode: SchedulingMode = "sarathi"

    @classmethod
    def from_config(cls, config: SchedulerConfig) -> BatchRules:
        return cls(config.max_num_batched_tokens, config.max_num_seqs, config.mode)

    @property
    def prompts_pause_decodes(self) -> bool:
        """prefill_first: an iteration with prompts to admit runs them alone (vLLM v0's stall)."""
        return self.mode == "prefill_first"

    def has_seat(self, num_running: int) -> bool:
        return num_running < self.max_num_seqs

    @staticmethod
    def decodes_first(running: Iterable[T], is_prefilling: Callable[[T], bool]) -> list[T]:
        """Running requests in the order their slices are cut: decodes before partial prefills (each
        group keeps the given order), so no decode ever waits behind a prompt."""
        decodes: list[T] = []
        prefills: list[T] = []
        for r in running:
            (prefills if is_prefilling(r) else decodes).append(r)
        return decodes + prefills

    @staticmethod
    def split_decodes(running: list[Request]) -> tuple[list[Request], list[Request]]:
        """decodes_first's two groups for Requests, the predicate inlined (the scheduler splits every
        running request every iteration): decodes (one known token without KV) and partial prefills
        (more), each in the given order. A request with no token to compute would get no slice
        (running_slice <= 0), so it is in neither."""
        decodes = [r for r in running if len(r.token_ids) - r.num_computed_tokens == 1]
        if len(decodes) == len(running):  # most iterations: no partial prefill
            return decodes, []
        return decodes, [r for r in running if len(r.token_ids) - r.num_computed_tokens > 1]

    @staticmethod
    def running_slice(num_uncomputed: int, budget: int) -> int:
        """Tokens a running request computes this iteration; <= 0 means none. A decode (one uncomputed
        token) takes 1 while any budget is left, which the scheduler relies on to skip this call."""
        return min(num_uncomputed, budget)

    def admission_slice(self, num_remaining: int, budget: int, admitted_any: bool) -> int | None:
        """Tokens a waiting request's first slice takes, or None if it must wait for a later iteration.

        sarathi chunks the prompt to the leftover budget. The baselines take it whole; one longer than
        the leftover budget is admitted only into an iteration that has admitted no other prompt yet,
        so a long prompt cannot starve (it runs over budget, alone among the new prompts)."""
        if self.mode == "sarathi":
            return min(num_remaining, budget)
        if num_remaining > budget and admitted_any:
            return None
        return num_remaining
