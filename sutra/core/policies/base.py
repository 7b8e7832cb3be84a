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

    def running_order(self, running: list[Request]) -> list[Request]:
        """Running requests from most to least entitled; the last one is preempted first."""
        return running

    def on_scheduled(self, request: Request, num_tokens: int) -> None:
        """Hook: the request computes num_tokens this iteration."""

    def on_generated(self, request: Request, num_tokens: int) -> None:
        """Hook: the request produced num_tokens output tokens."""
