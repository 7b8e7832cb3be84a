"""The Policy seam: it owns the waiting queue and orders the running set."""

from __future__ import annotations

from abc import ABC, abstractmethod

from sutra.core.request import Request


class Policy(ABC):
    @abstractmethod
    def add(self, request: Request) -> None:
        """A new request joins the waiting queue."""

    @abstractmethod
    def requeue(self, request: Request) -> None:
        """A preempted request goes back to the waiting queue."""

    @abstractmethod
    def peek(self) -> Request | None:
        """The waiting request to admit next, if any."""

    @abstractmethod
    def pop(self) -> Request:
        """Remove and return what peek() returned."""

    @abstractmethod
    def remove(self, request: Request) -> None:
        """Drop a waiting request (aborted)."""

    @abstractmethod
    def __len__(self) -> int: ...

    def adopt(self, request: Request) -> None:
        """A request arrives already running (moved here with its KV): the policy tracks its client
        as it would any admitted request's, but it never waits."""
        self.add(request)
        self.remove(request)

    def waiting_order(self) -> list[Request]:
        """The waiting requests in the order they would be admitted if nothing else arrived (a
        snapshot for completion-time estimates; it changes no state)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its waiting order")

    def running_order(self, running: list[Request]) -> list[Request]:
        """Running requests from most to least entitled; the last one is preempted first."""
        return running

    def may_preempt(self, waiting: Request, running: Request) -> bool:
        """Whether `waiting` may evict `running` (by recompute) to start at once when the engine is
        full. False by default: only a policy with a strict ranking across requests (priority)
        says yes, so FCFS and fairness policies never preempt for a newcomer."""
        return False

    def on_scheduled(self, request: Request, num_tokens: int) -> None:
        """Hook: the request computes num_tokens this iteration, starting at num_computed_tokens."""

    def on_generated(self, request: Request, num_tokens: int) -> None:
        """Hook: the request produced num_tokens output tokens."""

    def on_finished(self, request: Request) -> None:
        """Hook: the request left the engine (finished or aborted), waiting or running."""

    @property
    def num_tracked_clients(self) -> int:
        """Clients whose state the policy keeps (active ones, and idle ones it still remembers)."""
        return 0

    def can_forget_all(self) -> bool:
        """With nothing waiting or running: whether a fresh policy in its place would decide as this
        one would (what forgetting an idle client always changes, say a length prediction, aside)."""
        return self.num_tracked_clients == 0
