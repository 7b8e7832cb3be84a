"""What generation returns to users: per-request outputs with text, tokens, logprobs and timings."""

from __future__ import annotations

from dataclasses import dataclass, field

from sutra.errors import SutraError
from sutra.model.logprobs import TokenLogprobs


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_preemptions: int = 0

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    metrics: RequestMetrics
    finished: bool = False
    # Why the request failed while running (finished is then True). InvalidRequestError: its own
    # values left nothing to compute; RequestFailedError: an internal fault. Other requests go on.
    error: SutraError | None = None
    # With SamplingParams.prompt_logprobs: one entry per prompt token, None for the first (nothing
    # predicts it); complete once the first output token is out.
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    # With SamplingParams.pooling: the prompt's L2-normalized embedding (its final hidden states,
    # pooled), set when the request finishes; it generates no tokens.
    embedding: list[float] | None = None
