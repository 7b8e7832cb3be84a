"""Multi-client workloads for policy tests: clients that send on a schedule or stay backlogged, and a
meter of the service each client receives (the reference's cost: w_p per prompt token, w_q per
generated token, each counted once whatever preemption recomputes)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from sutra.core.output import SchedulerOutput
from sutra.core.policies import VTCPolicy
from sutra.core.request import Request, RequestStatus
from sutra.core.scheduler import Scheduler
from tests.core.fake_runner import FakeRunner, make_request, step


@dataclass
class Client:
    name: str
    prompt_len: int = 32
    max_tokens: int = 32
    every: int | None = None  # one request every `every` iterations
    backlog: int = 0  # keep at least this many requests waiting (a backlogged client)
    active: Callable[[int], bool] = lambda it: True  # iterations in which it sends
    priority: int = 0
    requests: list[Request] = field(default_factory=list)

    def num_waiting(self) -> int:
        waiting = (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        # Only the tail can still be waiting; looking at the last `backlog + 64` keeps this cheap.
        return sum(1 for r in self.requests[-(self.backlog + 64) :] if r.status in waiting)

    def send(self, scheduler: Scheduler, iteration: int) -> None:
        if not self.active(iteration):
            return
        count = 0
        if self.every is not None and iteration % self.every == 0:
            count += 1
        if self.backlog:
            count = max(count, self.backlog - self.num_waiting())
        for _ in range(count):
            r = make_request(self.prompt_len, self.max_tokens, client=self.name, priority=self.priority)
            self.requests.append(r)
            scheduler.add_request(r)


class ServiceMeter:
    def __init__(self, prompt_weight: float = 1.0, output_weight: float = 2.0) -> None:
        self.prompt_weight = prompt_weight
        self.output_weight = output_weight
        self.service: dict[str, float] = defaultdict(float)
        self._prompt_done: dict[str, int] = {}
        self._outputs_done: dict[str, int] = {}

    def record(self, requests: dict[str, Request], out: SchedulerOutput) -> None:
        """After update_from_output: credit what each scheduled request newly got."""
        for rid in out.num_scheduled_tokens:
            r = requests[rid]
            prompt = min(r.num_computed_tokens, r.num_prompt_tokens)
            new_prompt = max(0, prompt - self._prompt_done.get(rid, 0))
            new_out = r.num_output_tokens - self._outputs_done.get(rid, 0)
            self._prompt_done[rid] = max(prompt, self._prompt_done.get(rid, 0))
            self._outputs_done[rid] = r.num_output_tokens
            self.service[r.client] += self.prompt_weight * new_prompt + self.output_weight * new_out


def run(
    scheduler: Scheduler,
    clients: list[Client],
    iterations: int,
    meter: ServiceMeter | None = None,
    runner: FakeRunner | None = None,
    on_step: Callable[[int, SchedulerOutput], None] | None = None,
) -> ServiceMeter:
    """Drive the clients and the scheduler for a number of iterations (not to completion)."""
    meter = meter or ServiceMeter()
    runner = runner or FakeRunner()
    by_id = {r.request_id: r for client in clients for r in client.requests}
    for it in range(iterations):
        for client in clients:
            before = len(client.requests)
            client.send(scheduler, it)
            by_id.update((r.request_id, r) for r in client.requests[before:])
        out = step(scheduler, runner)
        meter.record(by_id, out)
        if on_step is not None:
            on_step(it, out)
    return meter


def admit_next(policy: VTCPolicy, prompt_tokens: int, outputs: int = 0) -> Request:
    """Pop the policy's next request and serve it: its whole prompt, then `outputs` generated tokens."""
    request = policy.pop()
    policy.on_scheduled(request, prompt_tokens)
    request.num_computed_tokens = prompt_tokens
    for _ in range(outputs):
        request.append_token(7)
        policy.on_generated(request, 1)
    return request
