"""First come, first served."""

from __future__ import annotations

from collections import deque
from operator import attrgetter

from sutra.core.policies.base import Policy
from sutra.core.request import Request

_ARRIVAL = attrgetter("arrival_time")  # a sort key in C: running_order sorts every step


class FCFSPolicy(Policy):
    def __init__(self) -> None:
        self._queue: deque[Request] = deque()

    def add(self, request: Request) -> None:
        self._queue.append(request)

    def requeue(self, request: Request) -> None:
        # A preempted request arrived before everything still waiting: it goes first.
        self._queue.appendleft(request)

    def peek(self) -> Request | None:
        return self._queue[0] if self._queue else None

    def pop(self) -> Request:
        return self._queue.popleft()

    def remove(self, request: Request) -> None:
        self._queue.remove(request)

    def __len__(self) -> int:
        return len(self._queue)

    def waiting_order(self) -> list[Request]:
        return list(self._queue)

    def running_order(self, running: list[Request]) -> list[Request]:
        return sorted(running, key=_ARRIVAL)
