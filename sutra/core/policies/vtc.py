"""Virtual Token Counter (VTC) fair scheduling, and least-counter-first (LCF), its no-lift baseline.

Fairness is defined on a token cost, w_p per prompt token plus w_q per generated token (defaults 1
and 2, the reference's), so backlogged clients get equal service, or service in proportion to their
weights. Each client has a counter of the (weighted) service it received; admission takes the head of
the queue of the backlogged client with the smallest counter (FCFS within a client). Ties go to the
client whose head request arrived first.

Counter lift: when a client's waiting queue goes from empty to non-empty, its counter becomes
max(own counter, min counter over the *other active* clients), active meaning with a request waiting
or running; when no other client is active, the minimum is the counter of the last client to go idle
(the paper's rule; the artifact does not lift then). A client that was idle therefore banks no
credit, yet one that was under-served while backlogged keeps its lead. Only a new request lifts: a
preempted request going back to the queue does not, because its client was not idle. (The
VTC-artifact, slora/server/router/vtc_req_queue.py `append`, takes the minimum over clients with a
non-empty waiting queue only. It admits only every few decode steps, so active clients' queues are
rarely empty there; this scheduler admits every iteration, so a client under its share usually has an
empty queue while it is served, and a waiting-only rule would let a returning client jump it with a
stale counter, which is LCF's failure.) LCF is the same code without the lift, so an idle client
returns with a low counter and starves the others until it catches up.

Charging, with chunked prefill: prompt tokens are charged as their chunks are scheduled (on_scheduled),
not all at admission. The counter then tracks service actually handed out, a long prompt chunked over
many iterations raises its client's counter as it runs, and one code path serves every scheduling mode.
Each request keeps a high-water mark of prompt positions charged, so a recompute after preemption is
never charged twice (the client did not cause it). Cost is defined on the request's tokens, as in the
reference, so prefix-cache hits are charged like computed tokens: a client's share does not depend on
what others left in the cache. Generated tokens are charged w_q each as they come (on_generated).

Length prediction (the artifact's vtc_pred_len variant; the engine's default, SchedulerConfig, while
the class defaults to the plain algorithm): at admission the client is charged
w_q times the predicted output length, then only tokens beyond the prediction as they come, and the
over-charge is refunded when the request ends. The predictor is the artifact's: a per-client moving
average of finished requests' output lengths with window 5 (avg = (avg * 4 + new) / 5, starting at the
first length), clamped to the request's max_tokens; a client with no finished request yet is predicted 0.

Weighted VTC divides every charge by the client's weight (clients not listed weigh 1). Preemption
victims: running requests are ordered by (client counter, arrival), so the least entitled, the latest
request of the client with the highest counter, is preempted first.

Bounded state: an idle client (nothing waiting or running) is remembered, counter and length history,
until it has been idle `idle_ttl_s`, and at most `max_idle_clients` idle clients are kept (the longest
idle is dropped first). A forgotten client that returns is a new one: counter 0, then lifted, and no
length history. Forgetting a counter cannot change a decision when it is at or below every counter the
client could be lifted to from now on. That floor is the smallest *settled* counter of the active
clients (the counter less the output charged in advance and not yet generated, which a refund may
take back): a settled counter never falls while its client is active, a client that becomes active is
lifted at least to the floor, and the last client to go idle leaves its counter as the next lift
target, so the floor never falls. At the time limit, a client ahead of the floor (it left while served
ahead of the others) is therefore kept and looked at again one time limit later; only the cap forgets
it anyway, and it may then gain at most that lead. What forgetting always changes: the length
prediction starts over (the first request after is charged as generated, as a new client's; its
client's counter is the same once it ends). LCF never lifts, so it forgets counters only at the cap.
The work is amortised O(1) per add or finished request (each idle entry is handled once per time
limit), plus one pass over the active clients when an entry ahead of the last known floor is due.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sutra.core.policies.base import Policy
from sutra.core.policies.idle import DEFAULT_IDLE_TTL_S, DEFAULT_MAX_IDLE_CLIENTS, IdleSet
from sutra.core.request import Request, RequestStatus

# Idle entries handled per add or finished request: more than the one each call can create, so the
# set shrinks back under its cap, and a constant, so no call scans them all.
_PRUNE_STEPS = 4

ANONYMOUS = "anonymous"  # the client of requests that name none


def client_key(request: Request) -> str:
    return request.client if request.client is not None else ANONYMOUS


@dataclass
class _Charge:
    """What one request has been charged so far."""

    prompt_tokens: int = 0  # prompt positions charged (a high-water mark)
    predicted: float = 0.0  # output tokens charged in advance (length prediction)
    advance: float = 0.0  # what that added to the client's counter (a refund takes back at most this)


class VTCPolicy(Policy):
    def __init__(
        self,
        prompt_weight: float = 1.0,
        output_weight: float = 2.0,
        client_weights: Mapping[str, float] | None = None,
        length_prediction: bool = False,
        prediction_window: int = 5,
        lift: bool = True,
        clock: Callable[[], float] = time.monotonic,
        idle_ttl_s: float = DEFAULT_IDLE_TTL_S,
        max_idle_clients: int = DEFAULT_MAX_IDLE_CLIENTS,
    ) -> None:
        if prompt_weight < 0 or output_weight < 0 or prompt_weight + output_weight <= 0:
            raise ValueError(
                f"VTC token weights must be >= 0 and not both 0, got {prompt_weight}, {output_weight}"
            )
        for client, weight in (client_weights or {}).items():
            if not weight > 0:
                raise ValueError(f"client weight must be > 0, got {weight!r} for {client!r}")
        self.prompt_weight = prompt_weight
        self.output_weight = output_weight
        self.client_weights = dict(client_weights or {})
        self.length_prediction = length_prediction
        self.prediction_window = prediction_window
        self.lift = lift
        self.counters: dict[str, float] = {}  # per client: weighted service received (plus lifts)
        self._queues: dict[str, deque[Request]] = {}  # backlogged clients only: scans stay short
        self._num_waiting = 0
        self._num_active: dict[str, int] = {}  # per client: requests waiting or running
        self._charges: dict[str, _Charge] = {}  # admitted, unfinished requests by id
        self._mean_output_len: dict[str, float] = {}  # per client, for length prediction
        self._advance: dict[str, float] = {}  # per active client: advance charges not yet settled
        self.clock = clock
        self._idle: IdleSet[str] = IdleSet(idle_ttl_s, max_idle_clients)
        # No active client's settled counter is below it, and nobody is lifted below it (see above).
        self._floor = 0.0

    def weight(self, client: str) -> float:
        return self.client_weights.get(client, 1.0)

    def _charge(self, client: str, cost: float) -> None:
        self.counters[client] = self.counters.get(client, 0.0) + cost / self.weight(client)

    # ---- the waiting queue ---------------------------------------------------------------------
    def add(self, request: Request) -> None:
        client = client_key(request)
        self.counters.setdefault(client, 0.0)
        queue = self._queues.get(client)
        if queue is None:  # the client's waiting queue was empty
            if self.lift:
                active = [self.counters[c] for c in self._num_active if c != client]
                target = min(active) if active else self._floor
                self.counters[client] = max(self.counters[client], target)
            queue = self._queues[client] = deque()
        queue.append(request)
        self._num_waiting += 1
        self._num_active[client] = self._num_active.get(client, 0) + 1
        self._idle.returned(client)
        self._prune()

    def requeue(self, request: Request) -> None:
        client = client_key(request)
        self.counters.setdefault(client, 0.0)
        self._queues.setdefault(client, deque()).appendleft(request)
        self._num_waiting += 1

    def _next_client(self) -> str | None:
        best: str | None = None
        best_key: tuple[float, float] | None = None
        for client, queue in self._queues.items():
            key = (self.counters[client], queue[0].arrival_time)
            if best_key is None or key < best_key:
                best, best_key = client, key
        return best

    def peek(self) -> Request | None:
        client = self._next_client()
        return self._queues[client][0] if client is not None else None

    def pop(self) -> Request:
        client = self._next_client()
        if client is None:
            raise IndexError("pop from an empty waiting queue")
        queue = self._queues[client]
        request = queue.popleft()
        if not queue:
            del self._queues[client]
        self._num_waiting -= 1
        if request.request_id not in self._charges:  # first admission, not a resume
            charge = self._charges[request.request_id] = _Charge()
            if self.length_prediction:
                charge.predicted = self.predicted_output_len(request)
                charge.advance = self.output_weight * charge.predicted / self.weight(client)
                self.counters[client] += charge.advance
                self._advance[client] = self._advance.get(client, 0.0) + charge.advance
        return request

    def remove(self, request: Request) -> None:
        client = client_key(request)
        queue = self._queues[client]
        queue.remove(request)
        if not queue:
            del self._queues[client]
        self._num_waiting -= 1

    def __len__(self) -> int:
        return self._num_waiting

    def waiting_order(self) -> list[Request]:
        """Simulated admissions: each pick charges the request's remaining prompt and its expected
        output (predicted, else max_tokens) to a copy of the counters."""
        heap = [(self.counters[c], q[0].arrival_time, c, 0) for c, q in self._queues.items()]
        heapq.heapify(heap)
        order: list[Request] = []
        while heap:
            counter, _, client, i = heapq.heappop(heap)
            queue = self._queues[client]
            request = queue[i]
            order.append(request)
            charged = self._charges.get(request.request_id, _Charge())
            cost = self.prompt_weight * (request.num_prompt_tokens - charged.prompt_tokens)
            cost += self.output_weight * max(0, self.expected_output_len(request) - request.num_output_tokens)
            if i + 1 < len(queue):
                counter += cost / self.weight(client)
                heapq.heappush(heap, (counter, queue[i + 1].arrival_time, client, i + 1))
        return order

    # ---- entitlement and accounting --------------------------------------------------------------
    def running_order(self, running: list[Request]) -> list[Request]:
        return sorted(running, key=lambda r: (self.counters.get(client_key(r), 0.0), r.arrival_time))

    def on_scheduled(self, request: Request, num_tokens: int) -> None:
        charge = self._charges.setdefault(request.request_id, _Charge())
        end = min(request.num_computed_tokens + num_tokens, request.num_prompt_tokens)
        if end > charge.prompt_tokens:
            self._charge(client_key(request), self.prompt_weight * (end - charge.prompt_tokens))
            charge.prompt_tokens = end

    def on_generated(self, request: Request, num_tokens: int) -> None:
        charge = self._charges.setdefault(request.request_id, _Charge())
        after = request.num_output_tokens
        before = after - num_tokens
        beyond = max(0.0, after - charge.predicted) - max(0.0, before - charge.predicted)
        if beyond > 0:
            self._charge(client_key(request), self.output_weight * beyond)

    def on_finished(self, request: Request) -> None:
        client = client_key(request)
        charge = self._charges.pop(request.request_id, None)
        if charge is not None:
            self._settle(client, request, charge)
        left = self._num_active.get(client, 0) - 1
        if left > 0:
            self._num_active[client] = left
            return
        self._num_active.pop(client, None)
        self._advance.pop(client, None)
        if client in self.counters or client in self._mean_output_len:
            if not self._num_active:  # the last active client: its counter is the next lift target
                self._floor = max(self._floor, self.counters.get(client, 0.0))
            self._idle.went_idle(client, self.clock())
        self._prune()

    def _settle(self, client: str, request: Request, charge: _Charge) -> None:
        if charge.predicted > request.num_output_tokens:  # refund the over-charge
            self._charge(client, -self.output_weight * (charge.predicted - request.num_output_tokens))
        if charge.advance:
            self._advance[client] = self._advance.get(client, 0.0) - charge.advance
        if self.length_prediction and request.status in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
        ):
            # An aborted request's length says nothing about the client's next one.
            old = self._mean_output_len.get(client)
            new = float(request.num_output_tokens)
            window = self.prediction_window
            self._mean_output_len[client] = new if old is None else (old * (window - 1) + new) / window

    # ---- bounded per-client state ------------------------------------------------------------
    @property
    def num_tracked_clients(self) -> int:
        # Every client with a length history has a counter too (it was added before it finished).
        return len(self.counters)

    def can_forget_all(self) -> bool:
        # Nobody active, and nobody ahead of the floor: a fresh policy decides the same, every
        # counter shifted by the floor (every returning client is lifted to the floor either way).
        if self._num_active:
            return False
        if not self.lift:
            return not self.counters
        return all(counter <= self._floor for counter in self.counters.values())

    def _lift_floor(self) -> float:
        """The smallest counter any client can be lifted to from now on (see the module docstring)."""
        settled = [self.counters.get(c, 0.0) - self._advance.get(c, 0.0) for c in self._num_active]
        return max(self._floor, min(settled)) if settled else self._floor

    def _prune(self) -> None:
        now = self.clock()
        floor: float | None = None  # computed at most once per call, and only if needed
        for _ in range(_PRUNE_STEPS):
            due = self._idle.due(now)
            if due is None:
                return
            client = due.key
            counter = self.counters.get(client, 0.0)
            if not due.forced and (not self.lift or counter > self._floor):
                if self.lift and floor is None:
                    floor = self._floor = self._lift_floor()
                if not self.lift or counter > floor:
                    # Forgetting would lift it less than remembering (it may be ahead): keep it.
                    self._idle.postpone(client, now)
                    continue
            self._idle.forget(client)
            self.counters.pop(client, None)
            self._mean_output_len.pop(client, None)

    # ---- length prediction ---------------------------------------------------------------------
    def predicted_output_len(self, request: Request) -> float:
        """The client's moving-average output length, at most max_tokens; 0 with no history."""
        mean = self._mean_output_len.get(client_key(request), 0.0)
        return min(mean, float(request.sampling_params.max_tokens))

    def expected_output_len(self, request: Request) -> int:
        """Output length to plan with: the prediction when enabled (and known), else max_tokens."""
        if self.length_prediction and client_key(request) in self._mean_output_len:
            return max(1, round(self.predicted_output_len(request)))
        return request.sampling_params.max_tokens


class LCFPolicy(VTCPolicy):
    """Least counter first: VTC's counters and admission without the lift (the reference's LCF
    baseline). An idle client banks credit and, on return, starves everyone until it catches up."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options, lift=False)
