"""Completion-time estimates (the PCS idea): tell a request when it will finish, as it arrives.

Two parts:
- StepLatencyModel: step latency = a + b * num_batched_tokens + c * num_seqs, fitted online by least
  squares from observed step times. It is a StepCost, so it prices the simulator's steps.
- CompletionEstimator.estimate_finishes: forks the live scheduler into a SimEngine (sutra/sim/fork.py)
  and runs it forward until the requests finish, summing the model's latency of each step. The
  batches are the real scheduler's: its rules, policy order, KV manager and preemptions.

How an engine uses it:
    estimator = CompletionEstimator()
    # after every step that scheduled something
    estimator.observe(out.total_num_scheduled_tokens, len(out.num_scheduled_tokens), step_seconds)
    # when a request is added (after scheduler.add_request), or whenever asked
    eta_seconds = estimator.estimate_finish(request, scheduler)

Assumptions, so the estimate is what it is:
- each request produces its expected output, `output_len(request)` if given, else max_tokens (both
  capped by max_model_len), and stops at nothing else (eos, stop tokens or strings);
- nothing else arrives, and nothing is aborted or moved (a paused request keeps its blocks; on a
  prefill instance of disaggregated serving, requests are priced as if they decoded there);
- a step takes what the latency model says, which ignores context length (attention cost);
- KV memory is what the pool holds now: preemptions and prefix-cache hits happen as the scheduler
  would make them, with the current cache contents (generated tokens are stand-ins, so only prompts
  and a request's own recompute hit);
- a policy's clock (rate limits) moves with simulated time.
Work is bounded, since the engine waits for estimates between steps: after `max_steps` simulated
steps (idle ones included) or `max_wall_s` of wall time (15 ms by default; a simulated step of a
64-request batch costs about 0.5 ms) each unfinished request's remaining time is extrapolated: its own
remaining steps at a full batch's pace, or, if longer, every token still to compute ahead of it at a
full token budget per step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from sutra.core.request import Request
from sutra.core.scheduler import Scheduler
from sutra.sampling_params import SamplingParams
from sutra.sim.simulator import SimEngine

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

    def step_seconds(self, slices: Iterable[tuple[int, int]]) -> float:
        """The StepCost of a batch of (cached context, new tokens) slices: the context is not a feature."""
        num_tokens = num_seqs = 0
        for _, new in slices:
            num_tokens += new
            num_seqs += 1
        return self.predict(num_tokens, num_seqs)


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


OutputLen = Callable[[Request], int]


class CompletionEstimator:
    """What an engine holds: feed it step times (observe), ask it for finish estimates."""

    def __init__(
        self, model: StepLatencyModel | None = None, max_steps: int = 10_000, max_wall_s: float = 0.015
    ) -> None:
        self.model = model if model is not None else StepLatencyModel()
        self.max_steps = max_steps
        # The engine computes estimates between its steps: every running request waits for them,
        # so the simulation stops after this much wall time and the rest is extrapolated.
        self.max_wall_s = max_wall_s

    def observe(self, num_batched_tokens: int, num_seqs: int, seconds: float) -> None:
        self.model.observe(num_batched_tokens, num_seqs, seconds)

    def estimate_finish(
        self, request: Request, scheduler: Scheduler, output_len: OutputLen | None = None
    ) -> float:
        """Estimated seconds from now until `request` finishes. A request the scheduler does not hold
        joins the back of the waiting queue, as scheduler.add_request would place it."""
        return self.estimate_finishes([request], scheduler, output_len)[0]

    def estimate_finishes(
        self, requests: list[Request], scheduler: Scheduler, output_len: OutputLen | None = None
    ) -> list[float]:
        """estimate_finish for several requests from one simulation (a burst of arrivals costs one).
        The scheduler is forked, never changed."""
        engine = SimEngine.fork(scheduler, self.model, name="estimate")
        forked = engine.scheduler
        # A prefill instance's requests finish on a decode instance it does not see: priced as if
        # they decoded here (parked ones resume), which a decode instance with room does no slower.
        for request_id in list(forked.parked):
            forked.unpark(request_id)
        for request in forked.requests.values():
            request.hand_off = False
        for original in scheduler.requests.values():
            _expect(forked.requests[original.request_id], original, forked, output_len)
        targets: list[Request] = []
        for request in requests:
            target = forked.requests.get(request.request_id)
            if target is None and not request.status.finished:
                target = _arriving(request)
                _expect(target, request, forked, output_len)
                forked.add_request(target)
            targets.append(target if target is not None else request)
        finish = {t.request_id: 0.0 for t in targets if t.status.finished}
        pending = {t.request_id for t in targets} - set(finish)
        deadline = time.perf_counter() + self.max_wall_s
        for _ in range(self.max_steps):
            if not pending or time.perf_counter() > deadline:
                break
            for stepped in engine.step():
                if stepped.status.finished and stepped.request_id in pending:
                    pending.discard(stepped.request_id)
                    finish[stepped.request_id] = engine.now
        # Out of simulation budget: a target's own remaining steps at a full batch's pace, or, if
        # longer, every token still to compute ahead of it (and its own) at a full budget per step.
        rules = forked.rules
        full_step = self.model.predict(rules.max_num_batched_tokens, rules.max_num_seqs)
        seconds_per_token = full_step / rules.max_num_batched_tokens
        ahead = 0
        for t in _in_service_order(forked):
            ahead += t.num_uncomputed_tokens + _outputs_left(t) - 1
            if t.request_id in pending:
                prefill_steps = -(-t.num_uncomputed_tokens // rules.max_num_batched_tokens)
                own = (prefill_steps + _outputs_left(t) - 1) * full_step
                finish[t.request_id] = engine.now + max(own, ahead * seconds_per_token)
                pending.discard(t.request_id)
        return [finish[t.request_id] for t in targets]


def _outputs_left(request: Request) -> int:
    return max(1, request.sampling_params.max_tokens - request.num_output_tokens)


def _in_service_order(scheduler: Scheduler) -> list[Request]:
    """Running requests, then the waiting ones in the policy's admission order (arrival order for a
    policy that cannot say), then any held aside (paused)."""
    running = {r.request_id for r in scheduler.running}
    try:
        waiting = scheduler.policy.waiting_order()
    except NotImplementedError:
        rest = (r for r in scheduler.requests.values() if r.request_id not in running)
        waiting = sorted(rest, key=lambda r: r.arrival_time)
    seen = running | {r.request_id for r in waiting}
    held = [r for r in scheduler.requests.values() if r.request_id not in seen]
    return [*scheduler.running, *waiting, *held]


def _arriving(request: Request) -> Request:
    """A copy of a request the scheduler does not hold, as it would arrive: waiting, nothing computed."""
    arriving = Request(
        request.request_id,
        request.prompt_token_ids,
        request.sampling_params,
        request.eos_token_ids,
        request.arrival_time,
        request.spec,
    )
    arriving.token_ids = list(request.token_ids)  # outputs so far (a request moved from elsewhere)
    return arriving


def _expect(forked: Request, original: Request, scheduler: Scheduler, output_len: OutputLen | None) -> None:
    """Make a forked request produce exactly its expected output: the simulated runner always
    samples the same token, so stopping at eos or stop tokens is off and max_tokens is the length."""
    total = output_len(original) if output_len is not None else original.sampling_params.max_tokens
    total = min(total, scheduler.max_model_len - original.num_prompt_tokens)
    forked.sampling_params = SamplingParams(max_tokens=max(1, total), ignore_eos=True, temperature=0.0)
