"""The simulator: Sutra's own scheduler, KV manager and policies in simulated time, with the model
replaced by SimExecutor and a cost model.

Time advances by the cost model's step time after each step; arrivals are added when the clock
passes them; an idle engine jumps to the next arrival. Every output token is stamped with the time
its step ended, so TTFT, TBT and end-to-end latency come out as a real run's would, batching,
chunking, preemption and the policy's order included, because they are the real scheduler's.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field, replace

from sutra.config import SchedulerConfig
from sutra.core.kv_cache import KVCacheManager
from sutra.core.request import Request, RequestSpec
from sutra.core.scheduler import Scheduler
from sutra.sampling_params import SamplingParams
from sutra.sim.executor import SimExecutor, StepCost
from sutra.sim.fork import fork_scheduler

IDLE_STEP_S = 0.05  # an engine with work it cannot schedule (rate limits) looks again this often


@dataclass
class SimRequest:
    request_id: str
    arrival_time: float
    prompt_len: int
    output_len: int
    spec: RequestSpec = field(default_factory=RequestSpec)
    prompt_token_ids: list[int] | None = None  # shared prefixes hit the prefix cache; default: unique


@dataclass
class SimTrace:
    """One request's life in simulated seconds."""

    arrival_time: float
    token_times: list[float] = field(default_factory=list)
    num_preemptions: int = 0
    first_scheduled_time: float | None = None  # when the step that began its prefill started

    @property
    def scheduling_delay(self) -> float | None:
        """Arrival to the start of its first step: the queueing that TTFT adds the prefill to."""
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.arrival_time

    @property
    def e2e(self) -> float:
        return self.token_times[-1] - self.arrival_time

    @property
    def tbts(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]

    @property
    def tpot(self) -> float:
        """Time per output token after the first (DistServe's TPOT); 0 for a one-token output."""
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else 0.0


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"mean": statistics.fmean(ordered), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99)}


@dataclass
class SimResult:
    traces: dict[str, SimTrace]
    duration_s: float  # simulated: first arrival to last token
    num_steps: int
    num_preemptions: int

    def summary(self) -> dict[str, object]:
        traces = [t for t in self.traces.values() if t.token_times]
        tokens = sum(len(t.token_times) for t in traces)
        return {
            "completed": len(traces),
            "duration_s": self.duration_s,
            "output_throughput": tokens / self.duration_s if self.duration_s > 0 else 0.0,
            "request_throughput": len(traces) / self.duration_s if self.duration_s > 0 else 0.0,
            "ttft_s": percentiles([t.ttft for t in traces]),
            "scheduling_delay_s": percentiles(
                [d for t in self.traces.values() if (d := t.scheduling_delay) is not None]
            ),
            "tbt_s": percentiles([g for t in traces for g in t.tbts]),
            "tpot_s": percentiles([t.tpot for t in traces if len(t.token_times) > 1]),
            "e2e_s": percentiles([t.e2e for t in traces]),
            "num_steps": self.num_steps,
            "num_preemptions": self.num_preemptions,
        }


class SimEngine:
    """One simulated engine instance: a real scheduler and KV manager with SimExecutor, on its own
    clock. `now` is when the engine is next free to step: a step that starts at `now` ends at
    `now + cost`. Requests are added when the clock has reached their arrival."""

    def __init__(self, scheduler: Scheduler, cost_model: StepCost, name: str = "engine") -> None:
        self.name = name
        self.scheduler = scheduler
        self.kv = scheduler.kv
        self.executor = SimExecutor(cost_model=cost_model, keep_steps=False)
        # An unchanged request's diff entry would only let the executor check its progress: most of a
        # step's diff, left out here.
        scheduler.report_unchanged_requests = False
        self.traces: dict[str, SimTrace] = {}
        self._params: dict[int, SamplingParams] = {}  # by output length: one validated object each
        self.now = 0.0
        self.num_steps = 0

    @classmethod
    def build(
        cls,
        scheduler_config: SchedulerConfig,
        cost_model: StepCost,
        num_blocks: int,
        block_size: int = 16,
        max_model_len: int = 8192,
        enable_prefix_caching: bool = True,
        name: str = "engine",
    ) -> SimEngine:
        kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
        return cls(Scheduler(scheduler_config, kv, max_model_len), cost_model, name)

    @classmethod
    def fork(cls, scheduler: Scheduler, cost_model: StepCost, name: str = "fork") -> SimEngine:
        """An engine on an exact copy of a live scheduler (sutra/sim/fork.py), its clock at 0, that
        runs that state forward without touching the original; the copy's policy clocks move with
        this engine's."""
        engine: SimEngine
        forked = fork_scheduler(scheduler, elapsed=lambda: engine.now)
        engine = cls(forked, cost_model, name)
        return engine

    def has_work(self) -> bool:
        """Something to step: a parked request (a prefill instance's, waiting for a decode instance
        to take it) is never scheduled, so an instance holding only those is idle until one leaves."""
        return len(self.scheduler.requests) > len(self.scheduler.parked)

    def add(self, spec: SimRequest) -> Request:
        """Hand the engine a request that has arrived (its clock moves up to the arrival if idle)."""
        if not self.has_work():
            self.now = max(self.now, spec.arrival_time)
        tokens = spec.prompt_token_ids
        if tokens is None:  # unique per request: no accidental prefix-cache hits
            seed = len(self.traces) * 7919 + sum(map(ord, self.name))
            tokens = [x % 50_000 + 17 for x in range(seed, seed + 31 * spec.prompt_len, 31)]
        params = self._params.get(spec.output_len)
        if params is None:  # the scheduler never changes a request's params, so requests share them
            params = SamplingParams(max_tokens=spec.output_len, ignore_eos=True, temperature=0.0)
            self._params[spec.output_len] = params
        request = Request(
            spec.request_id,
            tokens,
            params,
            arrival_time=spec.arrival_time,
            spec=spec.spec,
            hand_off=self.scheduler.config.hand_off_after_prefill,  # as the engine marks them (n == 1)
        )
        self.scheduler.add_request(request)
        self.traces[spec.request_id] = SimTrace(spec.arrival_time)
        return request

    def step(self, wait_until: float = float("inf")) -> list[Request]:
        """Run one step from `now` and stamp its tokens; returns the requests that got one. When
        nothing can be scheduled (every waiting client throttled), the clock moves on by
        IDLE_STEP_S, or to `wait_until` (the next arrival) if that is sooner."""
        out = self.scheduler.schedule()
        if out.is_empty:
            self.executor.execute(out)  # the executor still drops finished requests' state
            self.now = min(self.now + IDLE_STEP_S, max(wait_until, self.now))
            return []
        for new in out.new_requests:
            trace = self.traces.get(new.request_id)
            if trace is not None and trace.first_scheduled_time is None:
                trace.first_scheduled_time = self.now
        runner_out = self.executor.execute(out)
        now = self.now = self.now + self.executor.last_step_seconds
        self.num_steps += 1
        stepped = self.scheduler.update_from_output(out, runner_out)
        traces = self.traces
        for request in stepped:
            trace = traces.get(request.request_id)
            if trace is not None:
                trace.token_times.append(now)
                trace.num_preemptions = request.num_preemptions
        return stepped


class Simulator:
    """One engine over a whole workload: arrivals join when the clock passes them, an idle engine
    jumps to the next arrival."""

    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cost_model: StepCost,
        num_blocks: int,
        block_size: int = 16,
        max_model_len: int = 8192,
        enable_prefix_caching: bool = True,
    ) -> None:
        if scheduler_config.hand_off_after_prefill:
            raise ValueError("a prefill instance needs decode instances to hand off to: use DisaggSimulator")
        self.engine = SimEngine.build(
            scheduler_config, cost_model, num_blocks, block_size, max_model_len, enable_prefix_caching
        )
        self.scheduler = self.engine.scheduler
        self.kv = self.engine.kv

    def run(
        self, requests: list[SimRequest], max_steps: int = 10_000_000, max_concurrency: int | None = None
    ) -> SimResult:
        """Simulate the workload to the end. With `max_concurrency`, a request whose arrival finds
        that many in flight is sent when one finishes (as `sutra bench serve --max-concurrency`
        does): its arrival time, from which its TTFT counts, becomes that moment."""
        engine = self.engine
        pending = sorted(requests, key=lambda r: r.arrival_time)
        engine.now = start = pending[0].arrival_time if pending else engine.now
        limit = max_concurrency or len(pending) + 1
        slot_freed = -float("inf")  # when the number in flight last dropped below the limit
        i = 0
        while i < len(pending) or engine.has_work():
            while i < len(pending) and len(self.scheduler.requests) < limit:
                if pending[i].arrival_time > engine.now and engine.has_work():
                    break
                spec = pending[i]
                if spec.arrival_time < slot_freed:  # it arrived while every slot was taken
                    spec = replace(spec, arrival_time=slot_freed)
                engine.add(spec)
                i += 1
            may_send = i < len(pending) and len(self.scheduler.requests) < limit
            next_arrival = pending[i].arrival_time if may_send else float("inf")
            was_full = len(self.scheduler.requests) >= limit
            engine.step(next_arrival)
            if was_full and len(self.scheduler.requests) < limit:
                slot_freed = engine.now
            if engine.num_steps >= max_steps:
                raise RuntimeError(f"the simulation did not finish within {max_steps} steps")
        return SimResult(engine.traces, engine.now - start, engine.num_steps, self.scheduler.num_preemptions)
