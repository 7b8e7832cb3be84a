"""A request as the scheduler sees it: token ids, progress and status."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from sutra.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    # Kept with its KV but not scheduled while it moves to another instance; then resumed, or
    # released here (MIGRATED) once the other instance holds it.
    PAUSED = "paused"
    MIGRATED = "migrated"

    @property
    def finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.finished else None


@dataclass(frozen=True)
class RequestSpec:
    """How a request is to be served, beyond its prompt and sampling: one object carried unchanged
    from the HTTP handler (or the offline API) to the scheduler, and across instances when a request
    moves. A feature that needs a per-request setting adds a field here, not a parameter everywhere."""

    client: str | None = None  # who is served: fairness, rate limits and metrics are per client
    priority: int = 0  # lower is more urgent (priority policies)
    cache_salt: str | None = None  # requests share prefix-cache blocks only with the same salt


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    spec: RequestSpec = field(default_factory=RequestSpec)
    status: RequestStatus = RequestStatus.WAITING
    # Tokens whose KV is in the cache. A decode is a 1-token slice; a prefill chunk is a longer one.
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    num_preemptions: int = 0
    stop_token_id: int | None = None  # the stop/eos token that finished the request
    # Park after the first token, for a decode instance to take over (disaggregated serving).
    hand_off: bool = False

    def __post_init__(self) -> None:
        self.token_ids: list[int] = list(self.prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)

    @property
    def client(self) -> str | None:
        return self.spec.client

    @property
    def priority(self) -> int:
        return self.spec.priority

    @property
    def cache_salt(self) -> str | None:
        return self.spec.cache_salt

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        """True while more than one known token still lacks KV (a prompt, or a recompute after preemption)."""
        return self.num_uncomputed_tokens > 1

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
