"""Who goes first is a policy; how much fits is the scheduler's mechanism.

Registered policies (SchedulerConfig.policy):
- fcfs: first come, first served.
- vtc: Virtual Token Counter fair share per client (weights, optional length prediction).
- lcf: least counter first, VTC without the counter lift (baseline).
- rpm: FCFS with a per-client requests-per-minute limit (baseline).
- priority: strict priority classes (lower integer first), FCFS within a class; preempts less urgent
  running requests to start an urgent one on a full engine.
- priority-vtc: the same, with VTC fairness within each class.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sutra.core.policies.base import Policy
from sutra.core.policies.fcfs import FCFSPolicy
from sutra.core.policies.priority import PriorityPolicy
from sutra.core.policies.rpm import RPMPolicy
from sutra.core.policies.vtc import LCFPolicy, VTCPolicy

if TYPE_CHECKING:
    from sutra.config import SchedulerConfig

Clock = Callable[[], float]


def _fcfs(config: SchedulerConfig, clock: Clock) -> Policy:
    return FCFSPolicy()


def _counter_options(config: SchedulerConfig, clock: Clock) -> dict[str, Any]:
    return {
        "prompt_weight": config.vtc_prompt_weight,
        "output_weight": config.vtc_output_weight,
        "client_weights": config.client_weights,
        "length_prediction": config.length_prediction,
        **_idle_options(config, clock),
    }


def _idle_options(config: SchedulerConfig, clock: Clock) -> dict[str, Any]:
    return {
        "clock": clock,
        "idle_ttl_s": config.client_idle_ttl_s,
        "max_idle_clients": config.max_idle_clients,
    }


def _vtc(config: SchedulerConfig, clock: Clock) -> Policy:
    return VTCPolicy(**_counter_options(config, clock))


def _lcf(config: SchedulerConfig, clock: Clock) -> Policy:
    return LCFPolicy(**_counter_options(config, clock))


def _rpm(config: SchedulerConfig, clock: Clock) -> Policy:
    return RPMPolicy(
        limit=config.rpm_limit,
        client_weights=config.client_weights,
        clock=clock,
        max_clients=config.max_idle_clients,
    )


def _priority(config: SchedulerConfig, clock: Clock) -> Policy:
    return PriorityPolicy(FCFSPolicy, **_idle_options(config, clock))


def _priority_vtc(config: SchedulerConfig, clock: Clock) -> Policy:
    return PriorityPolicy(lambda: _vtc(config, clock), **_idle_options(config, clock))


POLICIES: dict[str, Callable[[SchedulerConfig, Clock], Policy]] = {
    "fcfs": _fcfs,
    "vtc": _vtc,
    "lcf": _lcf,
    "rpm": _rpm,
    "priority": _priority,
    "priority-vtc": _priority_vtc,
}


def make_policy(config: SchedulerConfig, clock: Clock = time.monotonic) -> Policy:
    """The policy config.policy names, built with the config's options; `clock` serves time-based
    policies (rpm's window, and how long idle clients are remembered)."""
    try:
        factory = POLICIES[config.policy]
    except KeyError:
        raise ValueError(
            f"unknown scheduling policy {config.policy!r}; choose one of {sorted(POLICIES)}"
        ) from None
    return factory(config, clock)


__all__ = [
    "POLICIES",
    "FCFSPolicy",
    "LCFPolicy",
    "Policy",
    "PriorityPolicy",
    "RPMPolicy",
    "VTCPolicy",
    "make_policy",
]
