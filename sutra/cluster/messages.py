"""What crosses between an instance actor and the front end: plain dataclasses that pickle as they
are (deltas, EngineStats and InstanceLoad are plain data too)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from sutra.core.stats import EngineStats, InstanceLoad
from sutra.engine.client import RequestDelta
from sutra.errors import SutraError


@dataclass(frozen=True)
class InstanceInfo:
    """What the front end needs to know of an instance once it is ready."""

    instance_id: str
    max_model_len: int
    max_request_tokens: int
    block_size: int
    num_threads: int
    pid: int
    node: str  # the host it runs on


@dataclass(frozen=True)
class InstanceReport:
    """An instance's state, read in one call every ~100 ms: its load for dispatch, its stats for
    /metrics, and whether its engine loop still runs."""

    load: InstanceLoad
    stats: EngineStats
    num_in_flight: int
    dead_reason: str | None


# admitted: the engine took the request (`estimate` is its completion estimate, if one was made);
# delta: progress; error: the request ended with `error`; ended: the instance ended the request
# without finishing it (it was aborted there); moved: the request continues on `destination` (live
# migration), whose updates for it follow from there.
UpdateKind = Literal["admitted", "delta", "error", "ended", "moved"]


@dataclass(frozen=True)
class Update:
    """One event of one request, in the order the instance produced them.

    Updates are keyed by request id, not by instance: the front end routes each to the request's
    stream whichever instance sent it, so a request that later moves to another instance keeps its
    stream. `seq` numbers the updates of one instance; the front end acknowledges them in its next
    poll, so an update whose poll reply was lost is sent again rather than dropped.
    """

    seq: int
    request_id: str
    kind: UpdateKind
    delta: RequestDelta | None = None
    error: SutraError | None = None
    estimate: tuple[float, float] | None = None  # (seconds from admission, monotonic time made)
    destination: str | None = None  # where a moved request went


@dataclass(frozen=True)
class MigrationReply:
    """The answer to one migration step on an instance: its value, or the error that called the
    migration off (returned, not raised, so the driver sees MigrationAborted as such)."""

    value: Any = None
    error: SutraError | None = None
