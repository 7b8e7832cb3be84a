"""EngineClient: what the OpenAI server needs from an engine, and nothing deeper.

Two things implement it: `AsyncEngine` (one engine in this process) and the cluster client (many
engine instances on Ray behind a global scheduler). The server is written against this interface
only, so it runs unchanged in front of either. Everything crossing it is plain data: a request is
(id, prompt token ids, SamplingParams) plus one RequestSpec; progress comes back as RequestDeltas.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from sutra.core.request import RequestSpec
from sutra.core.stats import EngineStats
from sutra.errors import SutraError
from sutra.model.logprobs import TokenLogprobs
from sutra.model.tokenizer import Tokenizer
from sutra.outputs import RequestMetrics
from sutra.sampling_params import SamplingParams


class EngineOverloadedError(SutraError):
    """The waiting queue is over its bound; the client should retry later."""


class EngineDrainingError(EngineOverloadedError):
    """The server is shutting down: it takes no new requests, and ends those left at its deadline."""


class EngineDeadError(SutraError):
    """A step failed (the requests in it are lost, the engine serves on), or the engine loop stopped."""


@dataclass
class CompletionDelta:
    """What one of a request's n completions gained since the last delta."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None
    stop_reason: str | int | None


@dataclass
class RequestDelta:
    request_id: str
    completions: list[CompletionDelta]
    num_prompt_tokens: int
    finished: bool
    metrics: RequestMetrics
    # RequestOutput.prompt_logprobs, once: with the request's first tokens.
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    # RequestOutput.embedding (pooling requests), once: on the final delta.
    embedding: list[float] | None = None


@dataclass(frozen=True)
class RequestInfo:
    """What the engine was given for a request in flight (for metrics and logs)."""

    client: str | None
    prompt_token_ids: list[int]
    arrival_time: float


class RequestMoved(Exception):  # noqa: N818 - a signal to a stream's reader, not an error
    """Ends a request's stream on one instance: it continues on `destination` (live migration)."""

    def __init__(self, request_id: str, destination: str) -> None:
        super().__init__(f"request {request_id} moved to {destination}")
        self.request_id = request_id
        self.destination = destination


# (request id, prompt token ids, sampling params): one engine request.
PromptRequest = tuple[str, list[int], SamplingParams]


class EngineListener(Protocol):
    """Told about every step's deltas and every abort, on the event loop (metrics, logs); must be
    cheap. An exception from a listener is logged and reaches neither the engine nor other listeners."""

    def on_step(self, engine: EngineClient, deltas: list[RequestDelta]) -> None: ...

    def on_abort(self, engine: EngineClient, request_id: str) -> None: ...


class EngineClient(Protocol):
    tokenizer: Tokenizer
    max_model_len: int
    listeners: list[EngineListener]

    @property
    def max_request_tokens(self) -> int:
        """The most tokens (prompt plus output) one request can hold."""
        ...

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    @property
    def dead_reason(self) -> str | None:
        """Why the engine cannot serve; None while it can."""
        ...

    @property
    def is_draining(self) -> bool: ...

    @property
    def num_in_flight(self) -> int:
        """Requests submitted and not yet finished, failed or aborted."""
        ...

    def begin_drain(self) -> None:
        """Refuse new requests from now on; only sets a flag, so a signal handler may call it."""
        ...

    def abort_all(self, error: Exception) -> int:
        """End every request in flight with `error`; returns how many."""
        ...

    # ---- requests --------------------------------------------------------------------------
    async def encode(self, prompt: str) -> list[int]: ...

    async def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> list[int]: ...

    async def submit_many(self, requests: list[PromptRequest], spec: RequestSpec = RequestSpec()) -> None:
        """Validate and queue the requests, all or none; raises InvalidRequestError (nothing queued)
        or EngineOverloadedError at once."""
        ...

    def stream(self, request_id: str) -> AsyncIterator[RequestDelta]:
        """Deltas of a submitted request until it finishes; leaving early aborts it."""
        ...

    def abort(self, request_id: str) -> None: ...

    async def estimated_finish(self, request_id: str) -> float | None:
        """Seconds from admission until the request should finish, once the engine holds it."""
        ...

    def estimate_of(self, request_id: str) -> tuple[float, float] | None:
        """(estimated seconds, monotonic time the estimate was made), if one was made."""
        ...

    def request_info(self, request_id: str) -> RequestInfo | None: ...

    def stats(self) -> EngineStats:
        """A snapshot of the engine's (or the cluster's summed) state, for /metrics."""
        ...
