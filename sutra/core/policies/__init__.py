"""Who goes first is a policy; how much fits is the scheduler's mechanism."""

from __future__ import annotations

from sutra.core.policies.base import Policy
from sutra.core.policies.fcfs import FCFSPolicy

POLICIES: dict[str, type[Policy]] = {"fcfs": FCFSPolicy}


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown scheduling policy {name!r}; choose one of {sorted(POLICIES)}") from None


__all__ = ["POLICIES", "FCFSPolicy", "Policy", "make_policy"]
