"""What the scheduler hands the model runner each iteration: a diff against the runner's state."""

from __future__ import annotations

from dataclasses import dataclass, field

from sutra.errors import SutraError
from sutra.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the runner has not seen, or one resumed after preemption (its state was dropped)."""

    request_id: str
    token_ids: list[int]  # prompt plus any tokens generated before a preemption
    num_prompt_tokens: int
    block_ids: list[int]
    num_computed_tokens: int  # prefix-cache hits
    sampling_params: SamplingParams


@dataclass
class CachedRequestData:
    """A request the runner already holds: only what changed."""

    request_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    new_requests: list[NewRequestData] = field(default_factory=list)
    # Scheduled requests the runner holds; those without new blocks are left out when the scheduler's
    # report_unchanged_requests is off (the simulator's).
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)  # request id -> slice length
    preempted_request_ids: list[str] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)  # since the last output: drop state

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


@dataclass
class RunnerOutput:
    """Tokens sampled for requests whose slice reached the end of their known tokens."""

    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, object] = field(default_factory=dict)  # request id -> TokenLogprobs
    # Requests this step could not compute, and why; they got no token and must be ended.
    failed: dict[str, SutraError] = field(default_factory=dict)
    # Requests that asked for prompt logprobs: (the prompt position of the first entry, TokenLogprobs
    # of the prompt tokens this step's slice predicts).
    prompt_logprobs: dict[str, tuple[int, list]] = field(default_factory=dict)
    # Pooling requests whose prompt this step completed: their L2-normalized embedding. They sample
    # nothing; the engine ends them.
    embeddings: dict[str, list[float]] = field(default_factory=dict)

    def merge(self, other: RunnerOutput) -> None:
        """Add the results of another run of the same step (disjoint requests)."""
        self.sampled_token_ids.update(other.sampled_token_ids)
        self.logprobs.update(other.logprobs)
        self.failed.update(other.failed)
        self.prompt_logprobs.update(other.prompt_logprobs)
        self.embeddings.update(other.embeddings)
