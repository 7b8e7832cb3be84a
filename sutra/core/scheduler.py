"""The token-budget scheduler (Sarathi-Serve stall-free batching), plain Python.

There are no phases. Every request has `num_computed_tokens` and a known token sequence; each
iteration hands out a budget of `max_num_batched_tokens` tokens. A decode is a 1-token slice, a
prefill chunk a longer one, and a prefix-cache hit simply starts `num_computed_tokens` further on.

Modes (the baselines are the same code with one switch, so benchmarks compare in one run):
- sarathi: running decodes first, then partial prefills, then new requests; each chunk is
  min(remaining prompt, leftover budget). Hybrid batches, no generation stalls.
- no_chunking: Orca-like hybrid batches, but a prompt is admitted only whole.
- prefill_first: vLLM-v0-like; an iteration with prompts to admit runs only prompts (whole), and
  the running decodes wait for it.
The rules of a batch (seats, budget, slice sizes, order, modes) are BatchRules (batch_rules.py),
shared with the preemption check below. The completion estimator runs this scheduler itself, on a
fork (sutra/sim/fork.py), so it has no rules of its own.

Preemption for a waiting request: before anything is scheduled, if the next waiting request could not
start this iteration (no free seat, too few free KV blocks, or no token budget left after the running
requests) and the policy says it may preempt some running requests (Policy.may_preempt: a strictly
more urgent priority class), the least entitled of those are preempted by recompute, as few as make it
fit and none if even all of them would not. Only the head of the queue makes room, so a burst of
urgent arrivals evicts gradually instead of flushing the batch. Victims are taken before any slice is
allocated, so no block is freed between its allocation and the step that writes it. Policies that
never preempt (FCFS, VTC) make this a no-op.

A request never holds more than `max_request_tokens` tokens (the context length, or what the whole
KV pool holds if that is less): at that size it ends with "length", as at the context length.
Otherwise a request alone in the engine that outgrew the pool would preempt itself, be readmitted
and grow into the same wall forever. The engine rejects up front any request whose prompt plus
max_tokens exceeds it, so this cap only ever applies to requests that bypass that check.
"""

from __future__ import annotations

import itertools

from sutra.config import SchedulerConfig
from sutra.core.batch_rules import BatchRules
from sutra.core.kv_cache import KVCacheManager
from sutra.core.output import CachedRequestData, NewRequestData, RunnerOutput, SchedulerOutput
from sutra.core.policies import Policy, make_policy
from sutra.core.request import Request, RequestStatus
from sutra.core.scheduler_moves import SchedulerMoves
from sutra.core.stats import EngineStats, InstanceLoad
from sutra.core.waiting_preemption import WaitingPreemption

_RUNNING = RequestStatus.RUNNING


class Scheduler(SchedulerMoves, WaitingPreemption):
    """See the module docstring; the moves of requests between instances are SchedulerMoves
    (scheduler_moves.py)."""

    def __init__(
        self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int, policy: Policy | None = None
    ) -> None:
        self.config = config
        self.rules = BatchRules.from_config(config)
        self.kv = kv
        self.max_model_len = max_model_len
        self.max_request_tokens = min(max_model_len, kv.pool.num_blocks * kv.block_size)
        self.policy = policy if policy is not None else make_policy(config)
        # Per-token hooks are called only when the policy has them (the per-token loops are the
        # simulator's hot path; FCFS counts nothing).
        kind = type(self.policy)
        self._policy_counts_tokens = (
            kind.on_scheduled is not Policy.on_scheduled or kind.on_generated is not Policy.on_generated
        )
        # Only a policy that overrides may_preempt ever preempts for a waiting request (FCFS and VTC
        # never do), so the others skip asking it about every running request every step.
        self._policy_preempts = kind.may_preempt is not Policy.may_preempt
        self.requests: dict[str, Request] = {}  # unfinished requests by id
        self.running: list[Request] = []
        # Requests past their first token waiting, with their KV, for a decode instance to take them
        # (hand_off requests on a prefill instance), oldest first. PAUSED: never scheduled or preempted.
        self.parked: dict[str, Request] = {}
        self._runner_blocks: dict[str, int] = {}  # requests whose state the runner holds -> its block count
        # Whether cached_requests has an entry for every scheduled request the runner holds, or only
        # for those with new blocks. An unchanged request's entry only lets the runner check its
        # progress: the simulator does without that check (SimEngine turns this off).
        self.report_unchanged_requests = True
        self._finished_for_runner: list[str] = []
        self.num_preemptions = 0

    # ---- requests in and out -------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if self.kv.blocks_needed(request.num_tokens + 1) > self.kv.pool.num_blocks:
            raise ValueError(
                f"a prompt of {request.num_tokens} tokens needs more KV blocks than the cache has "
                f"({self.kv.pool.num_blocks} blocks of {self.kv.block_size} tokens)"
            )
        self.requests[request.request_id] = request
        self.policy.add(request)

    def finish_request(self, request_id: str, status: RequestStatus) -> None:
        """End a request early (abort, or a stop string found by the detokenizer)."""
        request = self.requests.get(request_id)
        if request is not None:
            self._finish(request, status)

    def preempt_request(self, request_id: str) -> None:
        """Send a running request back to recompute from scratch: the slice it was given in the last
        schedule() is void (it read KV that was never written). Call before update_from_output."""
        request = self.requests.get(request_id)
        if request is None or request.status is not RequestStatus.RUNNING:
            return
        note = SchedulerOutput()
        self._preempt(request, note)
        # The runner drops a preempted request's state exactly as a finished one's.
        self._finished_for_runner.extend(note.preempted_request_ids)

    def abort_requests(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    @property
    def num_waiting(self) -> int:
        return len(self.policy)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- what the instance reports -----------------------------------------------------------
    def stats(self) -> EngineStats:
        kv = self.kv
        return EngineStats(
            num_running=len(self.running),
            num_waiting=self.num_waiting,
            num_preemptions=self.num_preemptions,
            num_parked=len(self.parked),
            kv_total_blocks=kv.pool.num_blocks,
            kv_free_blocks=kv.num_free_blocks,
            prefix_queries=kv.prefix_queries,
            prefix_hits=kv.prefix_hits,
        )

    def load_summary(self, draining: bool = False) -> InstanceLoad:
        head = self.policy.peek()
        urgent = any(r.priority < 0 for r in self.requests.values())
        headroom_blocks = self.config.priority_headroom_blocks if urgent else 0
        return InstanceLoad(
            total_blocks=self.kv.pool.num_blocks,
            used_blocks=self.kv.pool.num_blocks - self.kv.num_free_blocks,
            num_running=len(self.running),
            num_waiting=self.num_waiting,
            head_demand_blocks=0 if head is None else self.kv.blocks_needed(head.num_tokens),
            headroom_blocks=headroom_blocks,
            draining=draining,
            num_preemptions=self.num_preemptions,
            num_parked=len(self.parked),
        )

    # ---- one iteration ---------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_request_ids=self._finished_for_runner)
        self._finished_for_runner = []
        scheduled: dict[Request, int] = {}
        budget = self.rules.max_num_batched_tokens

        self._preempt_for_waiting(out)
        if self.rules.prompts_pause_decodes:
            budget = self._admit_waiting(scheduled, budget)
            if scheduled:
                return self._emit(out, scheduled)

        preempted = self._schedule_running(scheduled, budget, out)
        if not preempted and not self.rules.prompts_pause_decodes:
            # Admitting while memory is short would only preempt again next iteration.
            self._admit_waiting(scheduled, budget - sum(scheduled.values()))
        return self._emit(out, scheduled)

    def _running_in_order(self, running: list[Request]) -> list[Request]:
        decodes, prefills = self.rules.split_decodes(self.policy.running_order(running))
        return decodes + prefills

    def _schedule_running(self, scheduled: dict[Request, int], budget: int, out: SchedulerOutput) -> bool:
        decodes, prefills = self.rules.split_decodes(self.policy.running_order(self.running))
        on_scheduled = self.policy.on_scheduled if self._policy_counts_tokens else None
        preempted = False
        i = 0
        # Decodes first, one token each (running_slice(1, budget)) while the budget lasts, allocated
        # in runs up to one short of blocks; that one preempts as any slice does. Until something is
        # preempted every one of them is still running.
        while i < len(decodes) and budget > 0 and not preempted:
            stop = min(len(decodes), i + budget)
            end = self.kv.allocate_decodes(decodes, i, stop)
            run = decodes[i:end]
            scheduled.update(dict.fromkeys(run, 1))
            if on_scheduled is not None:
                for request in run:
                    on_scheduled(request, 1)
            budget -= end - i
            i = end
            if end < stop:
                budget, preempted = self._allocate_slice(decodes[end], 1, budget, scheduled, out)
                i += 1
        for request in itertools.chain(decodes[i:], prefills):
            if budget <= 0:
                break  # every later slice is empty, and only a slice's allocation can refund budget
            if request.status is not _RUNNING:
                continue  # preempted earlier in this loop
            num_new = self.rules.running_slice(len(request.token_ids) - request.num_computed_tokens, budget)
            if num_new > 0:
                budget, preempted_now = self._allocate_slice(request, num_new, budget, scheduled, out)
                preempted = preempted or preempted_now
        return preempted

    def _allocate_slice(
        self, request: Request, num_new: int, budget: int, scheduled: dict[Request, int], out: SchedulerOutput
    ) -> tuple[int, bool]:
        """Give a running request KV for its slice, preempting the least entitled running requests
        until it fits (a scheduled victim's slice goes back to the budget); the request may be the
        victim itself. Returns the budget left and whether anything was preempted."""
        preempted = False
        while not self.kv.allocate(request, num_new):
            victim = self._pick_victim(request)
            budget += scheduled.pop(victim, 0)
            self._preempt(victim, out)
            preempted = True
            if victim is request:
                return budget, preempted
        scheduled[request] = num_new
        if self._policy_counts_tokens:
            self.policy.on_scheduled(request, num_new)
        return budget - num_new, preempted

    def _admit_waiting(self, scheduled: dict[Request, int], budget: int) -> int:
        admitted_any = False
        while budget > 0 and self.rules.has_seat(len(self.running)):
            request = self.policy.peek()
            if request is None:
                break
            cached = self.kv.find_cached_prefix(request)
            num_cached = len(cached) * self.kv.block_size
            num_new = self.rules.admission_slice(request.num_tokens - num_cached, budget, admitted_any)
            if num_new is None:
                break
            # Admit only when the whole prompt's KV fits, so a chunked prompt never stalls half way.
            if not self.kv.can_fit(request.num_tokens, cached):
                break
            request.num_computed_tokens = num_cached
            if not self.kv.allocate(request, num_new, cached):
                request.num_computed_tokens = 0
                break
            self.policy.pop()
            self.kv.record_prefix_lookup(request.num_tokens, num_cached)
            if request.num_preemptions == 0:
                request.num_cached_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled[request] = num_new
            budget -= num_new
            admitted_any = True
            self.policy.on_scheduled(request, num_new)
        return budget

    def _pick_victim(self, needy: Request) -> Request:
        """The least entitled running request, which is `needy` itself when nothing ranks below it:
        a request never evicts a more entitled one (under priorities that would invert them)."""
        return self.policy.running_order(self.running)[-1]

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        """Preemption by recompute: drop the KV, requeue at the front; outputs so far are kept."""
        self.kv.free(request)
        self.running.remove(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.policy.requeue(request)
        if self._runner_blocks.pop(request.request_id, None) is not None:
            out.preempted_request_ids.append(request.request_id)

    def _emit(self, out: SchedulerOutput, scheduled: dict[Request, int]) -> SchedulerOutput:
        runner_blocks, tables = self._runner_blocks, self.kv.block_tables
        cached_requests, num_scheduled = out.cached_requests, out.num_scheduled_tokens
        report_unchanged = self.report_unchanged_requests
        for request, num_tokens in scheduled.items():
            rid = request.request_id
            known = runner_blocks.get(rid)
            num_blocks = len(tables.get(rid, ()))
            if known is None:
                out.new_requests.append(
                    NewRequestData(
                        request_id=rid,
                        token_ids=list(request.token_ids),
                        num_prompt_tokens=request.num_prompt_tokens,
                        block_ids=self.kv.block_ids(rid),
                        num_computed_tokens=request.num_computed_tokens,
                        sampling_params=request.sampling_params,
                    )
                )
                runner_blocks[rid] = num_blocks
            elif num_blocks > known:  # only the blocks the runner has not seen
                cached_requests.append(
                    CachedRequestData(rid, self.kv.block_ids(rid, known), request.num_computed_tokens)
                )
                runner_blocks[rid] = num_blocks
            elif report_unchanged:  # most steps: no new block
                cached_requests.append(CachedRequestData(rid, [], request.num_computed_tokens))
            num_scheduled[rid] = num_tokens
        return out

    # ---- results ---------------------------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput, runner_out: RunnerOutput) -> list[Request]:
        """Advance progress, append sampled tokens, apply token-level stops. Returns the requests
        that got a new token (finished ones included)."""
        updated: list[Request] = []
        requests, sampled, stop_status = self.requests, runner_out.sampled_token_ids, self._stop_status
        on_generated = self.policy.on_generated if self._policy_counts_tokens else None
        for rid, num_tokens in out.num_scheduled_tokens.items():
            request = requests.get(rid)
            if request is None or request.status is not _RUNNING:
                continue
            request.num_computed_tokens += num_tokens
            token = sampled.get(rid)
            if token is None:
                continue
            request.token_ids.append(token)
            if on_generated is not None:
                on_generated(request, 1)
            status = stop_status(request, token)
            if status is not None:
                self._finish(request, status)
            elif request.hand_off and request.num_output_tokens == 1:
                self._park(request)
            updated.append(request)
        return updated

    def _stop_status(self, request: Request, token: int) -> RequestStatus | None:
        params = request.sampling_params
        if token in params.stop_token_ids or (not params.ignore_eos and token in request.eos_token_ids):
            request.stop_token_id = token
            return RequestStatus.FINISHED_STOPPED
        num_tokens = len(request.token_ids)
        if (
            num_tokens - request.num_prompt_tokens >= params.max_tokens
            or num_tokens >= self.max_request_tokens
        ):
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            self.policy.remove(request)
        # A PAUSED request is in neither: it only holds its blocks.
        self.parked.pop(request.request_id, None)
        request.status = status
        self.policy.on_finished(request)
        self.kv.free(request)
        del self.requests[request.request_id]
        if self._runner_blocks.pop(request.request_id, None) is not None:
            self._finished_for_runner.append(request.request_id)
