"""Preemption for a waiting request: under a policy that lets the head of the queue evict running
requests (priorities), the fewest, least entitled ones go, and only if that lets the head start in this
iteration. A mixin of Scheduler (sutra/core/scheduler.py), run at the start of schedule()."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from sutra.core.output import SchedulerOutput
from sutra.core.request import Request

if TYPE_CHECKING:
    from sutra.core.scheduler import Scheduler


class WaitingPreemption:
    def _preempt_for_waiting(self: Scheduler, out: SchedulerOutput) -> None:
        head = self.policy.peek()
        if head is None or not self._policy_preempts:
            return
        if not any(self.policy.may_preempt(head, r) for r in self.running):
            return
        if self._can_start(head, []):
            return
        candidates = [
            r for r in reversed(self.policy.running_order(self.running)) if self.policy.may_preempt(head, r)
        ]
        if not self._can_start(head, candidates):
            return  # even all of them would not make room: preempt none
        # The fewest victims, least entitled first. More victims free more, so bisect; the check
        # after it covers the rare case where a freed budget token lets a prefill take a block.
        lo, hi = 1, len(candidates)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._can_start(head, candidates[:mid]):
                hi = mid
            else:
                lo = mid + 1
        if not self._can_start(head, candidates[:lo]):
            lo = len(candidates)
        for victim in candidates[:lo]:
            self._preempt(victim, out)

    def _can_start(self: Scheduler, head: Request, evicted: list[Request]) -> bool:
        """Whether `head` would be admitted this iteration if `evicted` were preempted first: a free
        seat, budget left after the running requests' slices, and KV for its whole prompt beside the
        blocks those slices take (the same rules and order as schedule())."""
        gone = set(evicted)
        staying = [r for r in self.running if r not in gone]
        if not self.rules.has_seat(len(staying)):
            return False
        budget = self.rules.max_num_batched_tokens
        growth = 0  # blocks the running slices will take
        if not self.rules.prompts_pause_decodes:  # there, an iteration with prompts runs only prompts
            for request in self._running_in_order(staying):
                num_new = self.rules.running_slice(request.num_uncomputed_tokens, budget)
                if num_new <= 0:
                    continue
                budget -= num_new
                held = len(self.kv.block_ids(request.request_id))
                growth += max(0, self.kv.blocks_needed(request.num_computed_tokens + num_new) - held)
            if budget <= 0:
                return False
        # Blocks the evicted requests alone hold come free; cached ones stay reusable by the head.
        released = Counter(b for r in evicted for b in self.kv.block_ids(r.request_id))
        blocks = self.kv.pool.blocks
        freed = sum(1 for b, n in released.items() if blocks[b].ref_count == n)
        cached = self.kv.find_cached_prefix(head)
        reused_free = sum(1 for b in cached if b.ref_count == released.get(b.block_id, 0))
        needed = self.kv.blocks_needed(head.num_tokens) - len(cached)
        return needed + growth <= self.kv.num_free_blocks + freed - reused_free
