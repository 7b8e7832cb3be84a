"""Requests-per-minute limiting: the rate-limit baseline that VTC is compared against.

FCFS across clients, except that a client which has started `limit` requests within the last 60 s
(a sliding window) waits until the oldest of them leaves the window; the others go ahead of it. The
default limit, 30 per minute, is the loosest of the reference's RPM baselines (5 to 30). A client's
limit is scaled by its weight (clients not listed weigh 1). Only first admissions count: a request
resumed after preemption is not a new request. Unlike the reference, which rejects excess requests,
they wait here, so the engine may idle while requests are queued: that is the baseline's known cost.

The clock is injectable (time.monotonic by default) so tests control the window.

Bounded state: a client's start times are forgotten once its latest start has left the window (they
can no longer hold it back, so nothing changes), a few per admission, oldest first. Beyond
`max_clients` clients with starts in the window, the one whose latest start is oldest is forgotten
early: within that window it may then start up to `limit` requests more.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping

from sutra.core.policies.base import Policy
from sutra.core.policies.idle import DEFAULT_MAX_IDLE_CLIENTS
from sutra.core.policies.vtc import client_key
from sutra.core.request import Request

WINDOW_S = 60.0
_PRUNE_STEPS = 4  # clients forgotten at most per admission (each admission adds at most one)


class RPMPolicy(Policy):
    def __init__(
        self,
        limit: int = 30,
        client_weights: Mapping[str, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
        window_s: float = WINDOW_S,
        max_clients: int = DEFAULT_MAX_IDLE_CLIENTS,
    ) -> None:
        if limit < 1:
            raise ValueError(f"rpm limit must be >= 1 request per minute, got {limit}")
        if max_clients < 0:
            raise ValueError(f"max_clients must be >= 0, got {max_clients}")
        self.limit = limit
        self.client_weights = dict(client_weights or {})
        self.clock = clock
        self.window_s = window_s
        # Per backlogged client, FCFS by sequence number; emptied queues are dropped, so scans stay short.
        self._queues: dict[str, deque[tuple[int, Request]]] = {}
        self._num_waiting = 0
        self._seq = itertools.count(1)
        self.max_clients = max_clients
        # Per client: times of first admissions in the window; the client with the oldest latest start first.
        self._starts: OrderedDict[str, deque[float]] = OrderedDict()
        self._started: set[str] = set()  # admitted, unfinished request ids (a resume is not counted)
        self._peek_time: float | None = None

    def _allowed(self, client: str, request: Request, now: float) -> bool:
        if request.request_id in self._started:
            return True
        starts = self._starts.get(client)
        if not starts:
            return True
        while starts and starts[0] <= now - self.window_s:
            starts.popleft()
        return len(starts) < self.limit * self.client_weights.get(client, 1.0)

    def _choose(self, now: float) -> str | None:
        best: str | None = None
        best_seq = 0
        for client, queue in self._queues.items():
            if (best is None or queue[0][0] < best_seq) and self._allowed(client, queue[0][1], now):
                best, best_seq = client, queue[0][0]
        return best

    def add(self, request: Request) -> None:
        self._queues.setdefault(client_key(request), deque()).append((next(self._seq), request))
        self._num_waiting += 1

    def requeue(self, request: Request) -> None:
        # Ahead of everything waiting, as in FCFS.
        self._queues.setdefault(client_key(request), deque()).appendleft((-next(self._seq), request))
        self._num_waiting += 1

    def peek(self) -> Request | None:
        self._peek_time = self.clock()
        client = self._choose(self._peek_time)
        return self._queues[client][0][1] if client is not None else None

    def pop(self) -> Request:
        # Decide at the peek's time, so pop() returns exactly what peek() showed.
        now = self._peek_time if self._peek_time is not None else self.clock()
        client = self._choose(now)
        if client is None:
            raise IndexError("pop from an empty (or fully rate-limited) waiting queue")
        queue = self._queues[client]
        _, request = queue.popleft()
        if not queue:
            del self._queues[client]
        self._num_waiting -= 1
        if request.request_id not in self._started:
            self._started.add(request.request_id)
            self._starts.setdefault(client, deque()).append(now)
            self._starts.move_to_end(client)
            self._prune(now)
        return request

    def _prune(self, now: float) -> None:
        for _ in range(_PRUNE_STEPS):
            if not self._starts:
                return
            client, starts = next(iter(self._starts.items()))
            in_window = bool(starts) and starts[-1] > now - self.window_s
            if in_window and len(self._starts) <= self.max_clients:
                return
            del self._starts[client]

    @property
    def num_tracked_clients(self) -> int:
        """Clients whose start times are kept."""
        return len(self._starts)

    def remove(self, request: Request) -> None:
        client = client_key(request)
        queue = self._queues.get(client, deque())
        for i, (_, queued) in enumerate(queue):
            if queued is request:
                del queue[i]
                if not queue:
                    del self._queues[client]
                self._num_waiting -= 1
                return
        raise ValueError(f"request {request.request_id!r} is not waiting")

    def __len__(self) -> int:
        return self._num_waiting

    def waiting_order(self) -> list[Request]:
        """FCFS order, ignoring the limit (a lower bound on how long a throttled request waits)."""
        return [r for _, r in sorted(e for q in self._queues.values() for e in q)]

    def running_order(self, running: list[Request]) -> list[Request]:
        return sorted(running, key=lambda r: r.arrival_time)

    def on_finished(self, request: Request) -> None:
        self._started.discard(request.request_id)
