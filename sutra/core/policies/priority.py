"""Strict priority classes, each with its own inner policy: fairness within a priority class.

A lower integer is more urgent (as in vLLM). The waiting queue is served class by class, most urgent
first; inside a class an inner policy decides (FCFS: order by arrival, so overall (priority, arrival);
VTC: per-client fair share among that class's clients, with counters of its own). Registered as
`priority` (inner FCFS) and `priority-vtc` (inner VTC with the config's VTC options).

Running requests are ordered by class, then by the inner policy, so the least urgent class loses KV
first. A waiting request may preempt a running one of a strictly less urgent class (may_preempt):
the scheduler uses that to start an urgent request at once on a full engine.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

from sutra.core.policies.base import Policy
from sutra.core.policies.fcfs import FCFSPolicy
from sutra.core.request import Request


class PriorityPolicy(Policy):
    def __init__(self, make_inner: Callable[[], Policy] = FCFSPolicy) -> None:
        self._make_inner = make_inner
        self._classes: dict[int, Policy] = {}
        self._levels: list[int] = []  # class priorities, most urgent first

    def _class(self, priority: int) -> Policy:
        inner = self._classes.get(priority)
        if inner is None:
            inner = self._classes[priority] = self._make_inner()
            bisect.insort(self._levels, priority)
        return inner

    def _next(self) -> Policy | None:
        # An inner policy may hold requests yet offer none now (a rate limit): the next class goes.
        for level in self._levels:
            inner = self._classes[level]
            if len(inner) and inner.peek() is not None:
                return inner
        return None

    def add(self, request: Request) -> None:
        self._class(request.priority).add(request)

    def requeue(self, request: Request) -> None:
        self._class(request.priority).requeue(request)

    def peek(self) -> Request | None:
        inner = self._next()
        return inner.peek() if inner is not None else None

    def pop(self) -> Request:
        inner = self._next()
        if inner is None:
            raise IndexError("pop from an empty waiting queue")
        return inner.pop()

    def remove(self, request: Request) -> None:
        self._class(request.priority).remove(request)

    def __len__(self) -> int:
        return sum(len(inner) for inner in self._classes.values())

    def waiting_order(self) -> list[Request]:
        return [r for level in self._levels for r in self._classes[level].waiting_order()]

    def running_order(self, running: list[Request]) -> list[Request]:
        by_level: dict[int, list[Request]] = {}
        for request in running:
            by_level.setdefault(request.priority, []).append(request)
        return [r for level in sorted(by_level) for r in self._class(level).running_order(by_level[level])]

    def may_preempt(self, waiting: Request, running: Request) -> bool:
        return waiting.priority < running.priority

    def on_scheduled(self, request: Request, num_tokens: int) -> None:
        self._class(request.priority).on_scheduled(request, num_tokens)

    def on_generated(self, request: Request, num_tokens: int) -> None:
        self._class(request.priority).on_generated(request, num_tokens)

    def on_finished(self, request: Request) -> None:
        self._class(request.priority).on_finished(request)
