"""Completion-time estimates (the PCS idea): tell a request when it will finish, as it arrives.

Two parts:
- StepLatencyModel: iteration latency = a + b * num_batched_tokens + c * num_seqs, fitted online by
  least squares from observed step times.
- estimate_finish: replays the scheduler forward from its current state (running requests in policy
  order, then the waiting queue in the policy's admission order up to the request), batch by batch
  under the same rules (token budget, decodes first, max_num_seqs, chunked or whole prompts), and sums
  the model's latency of each simulated batch.

How an engine uses it:
    estimator = CompletionEstimator()
    # after every step that scheduled something
    estimator.observe(out.total_num_scheduled_tokens, len(out.num_scheduled_tokens), step_seconds)
    # when a request is added (after scheduler.add_request), or whenever asked
    eta_seconds = estimator.estimate_finish(request, scheduler)

Assumptions, so the estimate is what it is: each request produces max_tokens (capped by
max_model_len) unless an `output_len` callable says otherwise; nothing else arrives; KV memory is
sufficient (no preemptions) and prefix-cache hits are ignored, so under memory pressure the estimate
is optimistic and with cache hits pessimistic. Work is bounded: phases where the batch does not change
(only decodes, nothing admissible) are jumped in one go, and after `max_steps` simulated batches the
remainder is extrapolated; at most `max_waiting` queued requests are simulated.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sutra.core.batch_rules import BatchRules
from sutra.core.request import Request, RequestStatus

if TYPE_CHECKING:
    from sutra.core.scheduler import Scheduler

Coefficients = tuple[float, float, float]  # (a seconds, b seconds per token, c seconds per sequence)


@dataclass
class StepLatencyModel:
    """Least squares on exponentially forgotten sums (recent steps count more, so the fit follows a
    changing machine), pulled toward `prior` with the strength of `ridge` samples, scaled per feature.
    The pull keeps the fit sane with few samples, or when a feature never varies (every step with the
    same number of sequences): the data cannot tell a from c then, and the prior decides the split."""

    prior: Coefficients = (0.01, 1e-4, 0.0)
    ridge: float = 0.1
    decay: float = 0.999
    _xtx: list[list[float]] = field(default_factory=lambda: [[0.0] * 3 for _ in range(3)], repr=False)
    _xty: list[float] = field(default_factory=lambda: [0.0] * 3, repr=False)
    _weight: float = 0.0  # effective number of samples
    _coef: Coefficients | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.ridge > 0:
            raise ValueError(f"ridge must be > 0, got {self.ridge}")
        if not 0 < self.decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")

    @property
    def num_samples(self) -> float:
        return self._weight

    def observe(self, num_batched_tokens: int, num_seqs: int, seconds: float) -> None:
        """One step: how many tokens it computed, for how many sequences, and how long it took.
        Empty steps say nothing about batch cost and are skipped."""
        if not 0 <= seconds < float("inf"):
            raise ValueError(f"step seconds must be finite and >= 0, got {seconds}")
        if num_batched_tokens <= 0 or num_seqs <= 0:
            return
        x = (1.0, float(num_batched_tokens), float(num_seqs))
        for i in range(3):
            self._xty[i] = self._xty[i] * self.decay + x[i] * seconds
            for j in range(3):
                self._xtx[i][j] = self._xtx[i][j] * self.decay + x[i] * x[j]
        self._weight = self._weight * self.decay + 1.0
        self._coef = None

    @property
    def coefficients(self) -> Coefficients:
        if self._coef is None:
            self._coef = self._fit()
        return self._coef

    def _fit(self) -> Coefficients:
        if self._weight == 0:
            return self.prior
        # Penalty ridge * s_i^2 * (theta_i - prior_i)^2 with s_i^2 the feature's mean square: the
        # pull is worth `ridge` samples whatever the feature's units.
        a = [row[:] for row in self._xtx]
        b = self._xty[:]
        for i in range(3):
            scale = self.ridge * max(self._xtx[i][i] / self._weight, 1e-12)
            a[i][i] += scale
            b[i] += scale * self.prior[i]
        solved = _solve3(a, b)
        return solved if solved is not None else self.prior

    def predict(self, num_batched_tokens: int, num_seqs: int) -> float:
        a, b, c = self.coefficients
        return max(0.0, a + b * num_batched_tokens + c * num_seqs)


def _solve3(a: list[list[float]], b: list[float]) -> Coefficients | None:
    """Gaussian elimination with partial pivoting; None if singular."""
    m = [a[i][:] + [b[i]] for i in range(3)]
    for col in range(3):
        pivot = max(range(col, 3), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-300:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, 3):
            f = m[r][col] / m[col][col]
            for k in range(col, 4):
                m[r][k] -= f * m[col][k]
    x = [0.0, 0.0, 0.0]
    for i in (2, 1, 0):
        x[i] = (m[i][3] - sum(m[i][k] * x[k] for k in range(i + 1, 3))) / m[i][i]
    return (x[0], x[1], x[2])


@dataclass
class _Sim:
    request: Request
    uncomputed: int  # known tokens without KV; 1 while decoding
    outputs_left: int


def _outputs_left(request: Request, scheduler: Scheduler, output_len: Callable[[Request], int] | None) -> int:
    total = output_len(request) if output_len is not None else request.sampling_params.max_tokens
    total = min(total, scheduler.max_model_len - request.num_prompt_tokens)
    return max(1, total - request.num_output_tokens)


def _waiting_order(scheduler: Scheduler) -> list[Request]:
    try:
        return scheduler.policy.waiting_order()
    except NotImplementedError:  # a policy that cannot say: assume arrival order
        waiting = (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        return sorted(
            (r for r in scheduler.requests.values() if r.status in waiting), key=lambda r: r.arrival_time
        )


def estimate_finish(
    request: Request,
    scheduler: Scheduler,
    model: StepLatencyModel,
    output_len: Callable[[Request], int] | None = None,
    max_steps: int = 10_000,
    max_waiting: int = 10_000,
) -> float:
    """Estimated seconds from now until `request` finishes. A request the scheduler does not hold
    is placed at the end of the waiting queue."""
    return estimate_finishes([request], scheduler, model, output_len, max_steps, max_waiting)[0]


def estimate_finishes(
    requests: list[Request],
    scheduler: Scheduler,
    model: StepLatencyModel,
    output_len: Callable[[Request], int] | None = None,
    max_steps: int = 10_000,
    max_waiting: int = 10_000,
) -> list[float]:
    """estimate_finish for several requests from one simulation (a burst of arrivals costs one)."""
    rules = scheduler.rules
    running = [
        _Sim(r, r.num_uncomputed_tokens, _outputs_left(r, scheduler, output_len))
        for r in scheduler.policy.running_order(scheduler.running)
    ]
    # Requests behind a target never delay its admission but do join its batches, making each
    # step slower: the whole queue is simulated (max_waiting bounds it).
    waiting = deque(
        _Sim(r, r.num_tokens, _outputs_left(r, scheduler, output_len))
        for r in _waiting_order(scheduler)[:max_waiting]
    )
    sims = {id(s.request): s for s in itertools.chain(running, waiting)}
    targets: list[_Sim] = []
    for request in requests:
        sim = sims.get(id(request))
        if sim is None:
            sim = _Sim(request, request.num_tokens, _outputs_left(request, scheduler, output_len))
            waiting.append(sim)
            sims[id(request)] = sim
        targets.append(sim)
    finish: dict[int, float] = {id(t.request): 0.0 for t in targets if t.request.status.finished}
    pending = {id(t.request) for t in targets} - set(finish)

    def record(sims_done: list[_Sim], elapsed: float) -> None:
        for sim in sims_done:
            key = id(sim.request)
            if key in pending:
                pending.discard(key)
                finish[key] = elapsed

    elapsed = 0.0
    for _ in range(max_steps):
        if not pending:
            break
        decodes = [s for s in running if s.uncomputed == 1]
        stable = len(decodes) == len(running) and len(decodes) <= rules.max_num_batched_tokens
        if stable and (not waiting or not rules.has_seat(len(running))):
            # Only decodes and nothing admissible: the batch stays the same until one finishes.
            k = min(s.outputs_left for s in running)
            elapsed += k * model.predict(len(running), len(running))
            for s in running:
                s.outputs_left -= k
        else:
            batch = _next_batch(running, waiting, rules)
            elapsed += model.predict(sum(n for _, n in batch), len(batch))
            for s, n in batch:
                s.uncomputed -= n
                if s.uncomputed == 0:
                    s.outputs_left -= 1
                    s.uncomputed = 1
        record([s for s in running if s.outputs_left == 0], elapsed)
        running = [s for s in running if s.outputs_left > 0]
    # Out of simulation budget: a target's own remaining work at a full batch's pace.
    full_step = model.predict(rules.max_num_batched_tokens, rules.max_num_seqs)
    for t in targets:
        if id(t.request) in pending:
            steps_left = t.outputs_left + -(-t.uncomputed // rules.max_num_batched_tokens)
            finish[id(t.request)] = elapsed + steps_left * full_step
    return [finish[id(t.request)] for t in targets]


def _next_batch(running: list[_Sim], waiting: deque[_Sim], rules: BatchRules) -> list[tuple[_Sim, int]]:
    """One iteration's slices, in the order Scheduler.schedule cuts them; admitted requests move to
    `running`."""
    batch: list[tuple[_Sim, int]] = []
    budget = rules.max_num_batched_tokens
    if rules.prompts_pause_decodes:
        budget = _admit(running, waiting, rules, budget, batch)
        if batch:
            return batch
    for s in rules.decodes_first(running, lambda s: s.uncomputed > 1):
        n = rules.running_slice(s.uncomputed, budget)
        if n > 0:
            batch.append((s, n))
            budget -= n
    if not rules.prompts_pause_decodes:
        _admit(running, waiting, rules, budget, batch)
    return batch


def _admit(
    running: list[_Sim], waiting: deque[_Sim], rules: BatchRules, budget: int, batch: list[tuple[_Sim, int]]
) -> int:
    """Admit from the head of `waiting` while seats and budget last; returns the budget left."""
    admitted_any = False
    while waiting and budget > 0 and rules.has_seat(len(running)):
        n = rules.admission_slice(waiting[0].uncomputed, budget, admitted_any)
        if n is None:
            break
        s = waiting.popleft()
        running.append(s)
        batch.append((s, n))
        budget -= n
        admitted_any = True
    return budget


class CompletionEstimator:
    """What an engine holds: feed it step times (observe), ask it for finish estimates."""

    def __init__(self, model: StepLatencyModel | None = None, max_steps: int = 10_000) -> None:
        self.model = model if model is not None else StepLatencyModel()
        self.max_steps = max_steps

    def observe(self, num_batched_tokens: int, num_seqs: int, seconds: float) -> None:
        self.model.observe(num_batched_tokens, num_seqs, seconds)

    def estimate_finish(
        self,
        request: Request,
        scheduler: Scheduler,
        output_len: Callable[[Request], int] | None = None,
    ) -> float:
        return estimate_finish(request, scheduler, self.model, output_len, self.max_steps)

    def estimate_finishes(
        self,
        requests: list[Request],
        scheduler: Scheduler,
        output_len: Callable[[Request], int] | None = None,
    ) -> list[float]:
        return estimate_finishes(requests, scheduler, self.model, output_len, self.max_steps)
