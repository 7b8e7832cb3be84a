"""What every EngineClient keeps of the requests in flight: one stream each (a queue its reader drains,
the completion estimate, what the request was submitted with), the drain and dead state, and the
reading side of the interface. AsyncEngine (one engine) and ClusterClient (many) differ only in how
deltas reach the queues, so both build on StreamHub.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from sutra.core.request import RequestSpec
from sutra.engine.client import EngineDeadError, EngineDrainingError, RequestDelta, RequestInfo
from sutra.model.tokenizer import Tokenizer

# Streams that ended before their reader arrived, kept for it (bounded: a reader that never comes
# must not leak them).
MAX_UNDELIVERED = 256


@dataclass(kw_only=True)
class Stream:
    queue: asyncio.Queue[RequestDelta | BaseException | None]  # None: aborted
    spec: RequestSpec
    prompt_token_ids: list[int]
    arrival_time: float
    admitted: asyncio.Future[float | None]  # the completion estimate, once an engine holds the request
    estimate: tuple[float, float] | None = None  # (seconds, monotonic time it was made)
    reading: bool = False  # a reader has called stream()


class StreamHub:
    """The requests in flight by id, and the EngineClient methods that only read them or the
    tokenizer. Subclasses set `tokenizer` and implement abort() and _end_stream()."""

    tokenizer: Tokenizer

    def __init__(self) -> None:
        self._streams: dict[str, Stream] = {}
        self._undelivered: dict[str, Stream] = {}
        self._draining = False
        self._dead_reason: str | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    @property
    def dead_reason(self) -> str | None:
        """Why the engine cannot serve (shut down, its loop stopped, every instance dead)."""
        return self._dead_reason

    @property
    def is_draining(self) -> bool:
        return self._draining

    @property
    def num_in_flight(self) -> int:
        """Requests submitted and not yet finished, failed or aborted."""
        return len(self._streams)

    def begin_drain(self) -> None:
        """Refuse new requests from now on (EngineDrainingError); those in flight carry on. Only sets
        a flag, so a signal handler may call it."""
        self._draining = True

    def abort_all(self, error: Exception) -> int:
        """End every request in flight with `error` (its stream raises it); returns how many."""
        request_ids = list(self._streams)
        for request_id in request_ids:
            self._end_stream(request_id, error)
        return len(request_ids)

    def _check_accepting(self) -> None:
        """Raise what a new request gets from an engine that is dead or draining."""
        if self._dead_reason is not None:
            raise EngineDeadError(self._dead_reason)
        if self._draining:
            raise EngineDrainingError("the server is shutting down and takes no new requests; retry later")

    def _end_stream(self, request_id: str, error: BaseException) -> None:
        raise NotImplementedError

    def abort(self, request_id: str) -> None:
        raise NotImplementedError

    # ---- tokenization, off the event loop -----------------------------------------------------
    async def encode(self, prompt: str) -> list[int]:
        return await asyncio.to_thread(self.tokenizer.encode, prompt)

    async def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> list[int]:
        return await asyncio.to_thread(
            self.tokenizer.apply_chat_template, messages, add_generation_prompt, tools
        )

    # ---- reading ---------------------------------------------------------------------------
    async def stream(self, request_id: str) -> AsyncIterator[RequestDelta]:
        """Deltas of a submitted request until it finishes. Leaving early (e.g. the client went
        away and the task was cancelled) aborts the request and frees its KV blocks."""
        stream = self._streams.get(request_id) or self._undelivered.pop(request_id, None)
        if stream is None:
            raise EngineDeadError(self._dead_reason or f"request {request_id!r} is not in flight")
        stream.reading = True
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if item is None:
                    return  # aborted: nothing more will come
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    async def estimated_finish(self, request_id: str) -> float | None:
        """Seconds from when an engine took the request until it should finish (the PCS idea);
        waits until one has taken it."""
        stream = self._streams.get(request_id)
        return None if stream is None else await stream.admitted

    def estimate_of(self, request_id: str) -> tuple[float, float] | None:
        stream = self._streams.get(request_id)
        return None if stream is None else stream.estimate

    def request_info(self, request_id: str) -> RequestInfo | None:
        stream = self._streams.get(request_id)
        if stream is None:
            return None
        return RequestInfo(stream.spec.client, stream.prompt_token_ids, stream.arrival_time)

    # ---- ending ----------------------------------------------------------------------------
    def _close(self, request_id: str, stream: Stream, last: RequestDelta | BaseException | None) -> None:
        """Hand the stream its last item and settle its estimate; a stream that ends before its
        reader arrived is kept for that reader."""
        stream.queue.put_nowait(last)
        if not stream.admitted.done():
            stream.admitted.set_result(None)
        if not stream.reading and last is not None:
            if len(self._undelivered) >= MAX_UNDELIVERED:
                del self._undelivered[next(iter(self._undelivered))]
            self._undelivered[request_id] = stream
