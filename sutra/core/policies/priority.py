"""Strict priority classes, each with its own inner policy: fairness within a priority class.

A lower integer is more urgent (as in vLLM). The waiting queue is served class by class, most urgent
first; inside a class an inner policy decides (FCFS: order by arrival, so overall (priority, arrival);
VTC: per-client fair share among that class's clients, with counters of its own). Registered as
`priority` (inner FCFS) and `priority-vtc` (inner VTC with the config's VTC options).

Running requests are ordered by class, then by the inner policy, so the least urgent class loses KV
first. A waiting request may preempt a running one of a strictly less urgent class (may_preempt):
the scheduler uses that to start an urgent request at once on a full engine.

Bounded state: `priority` is any integer a client sends, so classes come and go. A class with nothing
waiting or running is dropped at once when its inner policy remembers nobody (always under FCFS).
Otherwise (VTC remembering idle clients) it is kept like an idle client: dropped after `idle_ttl_s`
if a fresh class would decide the same (Policy.can_forget_all), else looked at again later; and while
the idle classes remember more than `max_idle_clients` clients (each class counting at least one),
the longest idle is dropped whatever it held. Only classes with waiting requests are visited when
choosing the next request, so idle classes cost no time per step.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable

from sutra.core.policies.base import Policy
from sutra.core.policies.fcfs import FCFSPolicy
from sutra.core.policies.idle import DEFAULT_IDLE_TTL_S, DEFAULT_MAX_IDLE_CLIENTS, IdleSet
from sutra.core.request import Request

_PRUNE_STEPS = 4  # idle classes handled per add or finished request (each call idles at most one)


class PriorityPolicy(Policy):
    def __init__(
        self,
        make_inner: Callable[[], Policy] = FCFSPolicy,
        clock: Callable[[], float] = time.monotonic,
        idle_ttl_s: float = DEFAULT_IDLE_TTL_S,
        max_idle_clients: int = DEFAULT_MAX_IDLE_CLIENTS,
    ) -> None:
        self._make_inner = make_inner
        self._classes: dict[int, Policy] = {}
        self._active: dict[int, int] = {}  # per class: requests waiting or running
        self._levels: list[int] = []  # classes with a waiting request, most urgent first
        self._num_waiting = 0
        self.clock = clock
        self.max_idle_clients = max_idle_clients
        self._idle: IdleSet[int] = IdleSet(idle_ttl_s, max_idle_clients)
        self._idle_sizes: dict[int, int] = {}  # idle class -> clients it remembers (at least 1)
        self._idle_total = 0

    def _class(self, priority: int) -> Policy:
        inner = self._classes.get(priority)
        if inner is None:
            inner = self._classes[priority] = self._make_inner()
        return inner

    def _now_waiting(self, level: int) -> None:
        i = bisect.bisect_left(self._levels, level)
        if i == len(self._levels) or self._levels[i] != level:
            self._levels.insert(i, level)

    def _maybe_done_waiting(self, level: int, inner: Policy) -> None:
        if not len(inner):
            i = bisect.bisect_left(self._levels, level)
            if i < len(self._levels) and self._levels[i] == level:
                del self._levels[i]

    def _next(self) -> Policy | None:
        # An inner policy may hold requests yet offer none now (a rate limit): the next class goes.
        for level in self._levels:
            inner = self._classes[level]
            if inner.peek() is not None:
                return inner
        return None

    def add(self, request: Request) -> None:
        level = request.priority
        if level in self._idle:
            self._idle.returned(level)
            self._idle_total -= self._idle_sizes.pop(level)
        self._active[level] = self._active.get(level, 0) + 1
        self._class(level).add(request)
        self._num_waiting += 1
        self._now_waiting(level)
        self._prune()

    def requeue(self, request: Request) -> None:
        self._class(request.priority).requeue(request)
        self._num_waiting += 1
        self._now_waiting(request.priority)

    def peek(self) -> Request | None:
        inner = self._next()
        return inner.peek() if inner is not None else None

    def pop(self) -> Request:
        inner = self._next()
        if inner is None:
            raise IndexError("pop from an empty waiting queue")
        request = inner.pop()
        self._num_waiting -= 1
        self._maybe_done_waiting(request.priority, inner)
        return request

    def remove(self, request: Request) -> None:
        inner = self._classes[request.priority]
        inner.remove(request)
        self._num_waiting -= 1
        self._maybe_done_waiting(request.priority, inner)

    def __len__(self) -> int:
        return self._num_waiting

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
        level = request.priority
        inner = self._classes.get(level)
        if inner is None:
            return
        inner.on_finished(request)
        left = self._active.get(level, 0) - 1
        if left > 0:
            self._active[level] = left
            return
        self._active.pop(level, None)
        remembered = inner.num_tracked_clients
        if remembered == 0:  # a fresh class is the same
            del self._classes[level]
        else:
            self._idle.went_idle(level, self.clock())
            self._idle_sizes[level] = remembered
            self._idle_total += remembered
        self._prune()

    # ---- bounded state ---------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self._classes)

    @property
    def num_tracked_clients(self) -> int:
        return sum(inner.num_tracked_clients for inner in self._classes.values())

    def can_forget_all(self) -> bool:
        return not self._active and all(inner.can_forget_all() for inner in self._classes.values())

    def _prune(self) -> None:
        now = self.clock()
        for _ in range(_PRUNE_STEPS):
            due = self._idle.due(now)
            if self._idle_total > self.max_idle_clients:
                level, forced = self._idle.oldest(), True
            elif due is None:
                return
            else:
                level, forced = due.key, due.forced
            if not forced and not self._classes[level].can_forget_all():
                self._idle.postpone(level, now)
                continue
            self._idle.forget(level)
            self._idle_total -= self._idle_sizes.pop(level)
            del self._classes[level]
