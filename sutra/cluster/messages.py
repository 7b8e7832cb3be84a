"""What crosses between an instance actor and the front end: plain dataclasses that pickle as they
are (deltas, EngineStats and InstanceLoad are plain data too)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from sutra.core.stats import EngineStats, InstanceLoad
from sutra.engine.client import RequestDelta
from sutra.engine.migration import MovedRequest
from sutra.engine.migration_endpoint import MigrationResult
from sutra.errors import SutraError

# mixed: prefills and decodes its requests (colocated); prefill: runs prompts and parks each request
# after its first token for a decode instance, which pulls it (disaggregated serving, DistServe).
InstanceRole = Literal["mixed", "prefill", "decode"]
INSTANCE_ROLES: tuple[InstanceRole, ...] = ("mixed", "prefill", "decode")


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
    role: InstanceRole = "mixed"
    model: str = ""  # the model it serves, by name, in a cluster of several models


@dataclass(frozen=True)
class ModelHoldings:
    """Which models an instance holds in which tier (ServerlessLLM): one ready (its engine serves
    it), others' weights in its host memory; with the bandwidth it measured loading from each tier."""

    instance_id: str
    ready: str | None
    cached: tuple[str, ...]  # in its host cache, the next to be dropped first
    bandwidth: dict[str, float]  # "cache" / "disk" -> bytes/s of its latest load from there
    model_bytes: dict[str, int]  # weight bytes of each model it has loaded


@dataclass(frozen=True)
class ModelSwitch:
    """The answer to a model switch: the instance as it now is (serving the new model, or the old
    one again when the new one failed to load: `error` says why)."""

    info: InstanceInfo
    holdings: ModelHoldings
    tier: str  # where the loaded model's weights came from: "cache" or "disk"
    seconds: float
    error: SutraError | None = None


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
# migration), whose updates for it follow from there; parked: a prefill instance holds the request's
# KV after its first token, for a decode instance to pull.
UpdateKind = Literal["admitted", "delta", "error", "ended", "moved", "parked"]


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
    num_tokens: int = 0  # parked: the tokens whose KV the prefill instance holds for it


@dataclass(frozen=True)
class MigrationReply:
    """The answer to one migration step on an instance: its value, or the error that called the
    migration off (returned, not raised, so the driver sees MigrationAborted as such)."""

    value: Any = None
    error: SutraError | None = None


@dataclass(frozen=True)
class PullReply:
    """How a decode instance's pull of a parked request went; with what failover needs should the
    prefill instance die before its "moved" update arrives (as the Migrator's Move records)."""

    result: MigrationResult
    moved: MovedRequest | None = None  # the request as the prefill instance handed it over
    committed: bool = False  # the decode instance holds the request
