"""AsyncEngine: the asyncio face of LLMEngine that the server uses.

One engine loop task owns the LLMEngine. Requests and aborts from handlers are queued and applied
between steps; each step runs in one dedicated thread (torch releases the GIL, so the event loop keeps
serving HTTP meanwhile). After a step the loop turns each request's progress into a delta and hands it
to that request's asyncio queue, so handlers never read engine state while a step mutates it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from sutra.engine.engine import LLMEngine
from sutra.errors import SutraError
from sutra.model.sampling import TokenLogprobs
from sutra.outputs import RequestMetrics, RequestOutput
from sutra.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineOverloadedError(SutraError):
    """The waiting queue is over its bound; the client should retry later."""


class EngineDeadError(SutraError):
    """A step failed; the requests that were in flight are lost, the engine keeps serving new ones."""


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


@dataclass
class _Stream:
    queue: asyncio.Queue[RequestDelta | BaseException | None]  # None: aborted
    params: SamplingParams
    client: str | None
    sent_text: list[int]  # per completion: characters already handed out
    sent_tokens: list[int]
    holdback: int  # characters kept back while a stop string may still be forming
    admitted: asyncio.Future[float | None]  # the completion estimate, once the engine holds the request
    estimate: tuple[float, float] | None = None  # (seconds, monotonic time it was made)


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    client: str | None
    priority: int
    arrival_time: float


class EngineListener(Protocol):
    """Told about every step and abort, on the event loop (metrics, estimates); must be cheap."""

    def on_step(self, engine: AsyncEngine, outputs: list[RequestOutput]) -> None: ...

    def on_abort(self, engine: AsyncEngine, request_id: str) -> None: ...


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting_requests: int | None = None) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.max_waiting_requests = max_waiting_requests
        self.listeners: list[EngineListener] = []
        self._streams: dict[str, _Stream] = {}
        self._pending_adds: list[_Add] = []
        self._pending_aborts: list[str] = []
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sutra-step")
        self._task: asyncio.Task[None] | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sutra-engine-loop")

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._executor.shutdown(wait=True)

    # ---- requests --------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return self.engine.scheduler.num_waiting + len(self._pending_adds)

    async def encode(self, prompt: str) -> list[int]:
        """Tokenize in a worker thread, off the event loop."""
        return await asyncio.to_thread(self.engine.encode_prompt, prompt)

    async def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True
    ) -> list[int]:
        return await asyncio.to_thread(self.tokenizer.apply_chat_template, messages, add_generation_prompt)

    def submit(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        client: str | None = None,
        priority: int = 0,
    ) -> None:
        """Validate and queue a request; raises InvalidRequestError or EngineOverloadedError at once."""
        self.submit_many([(request_id, prompt_token_ids, params)], client=client, priority=priority)

    def submit_many(
        self,
        requests: list[tuple[str, list[int], SamplingParams]],
        *,
        client: str | None = None,
        priority: int = 0,
    ) -> None:
        """Validate and queue (request id, prompt token ids, params) triples, all or none: if one is
        invalid, or they do not all fit under the waiting bound, nothing is queued."""
        for request_id, prompt_token_ids, _ in requests:
            self.engine.validate(prompt_token_ids)
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
        if (
            self.max_waiting_requests is not None
            and self.num_waiting + len(requests) > self.max_waiting_requests
        ):
            raise EngineOverloadedError(
                f"the server has {self.num_waiting} requests waiting (limit {self.max_waiting_requests}); "
                "retry later"
            )
        now = time.monotonic()
        for request_id, prompt_token_ids, params in requests:
            self._streams[request_id] = _Stream(
                queue=asyncio.Queue(),
                params=params,
                client=client,
                sent_text=[0] * params.n,
                sent_tokens=[0] * params.n,
                holdback=max((len(s) for s in params.stop), default=1) - 1,
                admitted=asyncio.get_running_loop().create_future(),
            )
            self._pending_adds.append(_Add(request_id, prompt_token_ids, params, client, priority, now))
        self._wakeup.set()

    async def stream(self, request_id: str) -> AsyncIterator[RequestDelta]:
        """Deltas of a submitted request until it finishes. Leaving early (e.g. the client went
        away and the task was cancelled) aborts the request and frees its KV blocks."""
        stream = self._streams[request_id]
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

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, **submit_kwargs: Any
    ) -> AsyncIterator[RequestDelta]:
        """submit() and stream() in one."""
        self.submit(request_id, prompt_token_ids, params, **submit_kwargs)
        async for delta in self.stream(request_id):
            yield delta

    def abort(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.queue.put_nowait(None)  # wakes a reader, which then ends
            if not stream.admitted.done():
                stream.admitted.set_result(None)
            self._pending_aborts.append(request_id)
            self._wakeup.set()
            for listener in self.listeners:
                listener.on_abort(self, request_id)

    async def estimated_finish(self, request_id: str) -> float | None:
        """Seconds from when the engine took the request until it should finish (the PCS idea);
        waits for the engine loop to take it (at the latest after the current step)."""
        stream = self._streams.get(request_id)
        return None if stream is None else await stream.admitted

    def estimate_of(self, request_id: str) -> tuple[float, float] | None:
        stream = self._streams.get(request_id)
        return None if stream is None else stream.estimate

    def client_of(self, request_id: str) -> str | None:
        stream = self._streams.get(request_id)
        return None if stream is None else stream.client

    # ---- the loop --------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not (self._pending_adds or self._pending_aborts or self.engine.has_unfinished_requests()):
                self._wakeup.clear()
                await self._wakeup.wait()
            added = self._apply_pending()
            if added:
                # The estimate replays the scheduler over the whole queue: off the event loop.
                estimates = await loop.run_in_executor(self._executor, self._estimates, added)
                self._publish_estimates(added, estimates)
            if not self.engine.has_unfinished_requests():
                continue
            try:
                outputs = await loop.run_in_executor(self._executor, self.engine.step)
            except Exception as e:  # a bug in a step must not take the server down
                logger.exception("engine step failed; failing the requests in flight")
                self._fail_all(EngineDeadError(f"the engine step failed: {e}"))
                continue
            for listener in self.listeners:
                listener.on_step(self, outputs)
            self._publish(outputs)

    def _apply_pending(self) -> list[str]:
        """Hands queued adds and aborts to the engine; returns the ids it took."""
        adds, self._pending_adds = self._pending_adds, []
        aborts, self._pending_aborts = self._pending_aborts, []
        added: list[str] = []
        for add in adds:
            if add.request_id not in self._streams:
                continue  # aborted before it ever reached the engine
            try:
                self.engine.add_request(
                    add.request_id,
                    add.prompt_token_ids,
                    add.params,
                    client=add.client,
                    priority=add.priority,
                    arrival_time=add.arrival_time,
                    prompt_token_ids=add.prompt_token_ids,
                )
                added.append(add.request_id)
            except Exception as e:
                stream = self._streams.pop(add.request_id)
                stream.queue.put_nowait(e)
                stream.admitted.set_result(None)
        for request_id in aborts:
            self.engine.abort_request(request_id)
        return added

    def _estimates(self, request_ids: list[str]) -> dict[str, float]:
        try:
            return self.engine.estimate_finishes(request_ids)
        except Exception:  # an estimate is a courtesy; never let it fail a request
            logger.exception("completion estimate failed")
            return {}

    def _publish_estimates(self, request_ids: list[str], estimates: dict[str, float]) -> None:
        now = time.monotonic()
        for rid in request_ids:
            stream = self._streams.get(rid)
            if stream is None or stream.admitted.done():
                continue  # aborted (or failed) while the estimate ran
            seconds = estimates.get(rid)
            stream.estimate = None if seconds is None else (seconds, now)
            stream.admitted.set_result(seconds)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted while the step ran; the abort is pending
            stream.queue.put_nowait(self._delta(out, stream))
            if out.finished:
                del self._streams[out.request_id]

    @staticmethod
    def _delta(out: RequestOutput, stream: _Stream) -> RequestDelta:
        completions = []
        for i, c in enumerate(out.outputs):
            # Text that could be the start of a stop string stays back until it cannot be.
            end = len(c.text) if c.finished else max(stream.sent_text[i], len(c.text) - stream.holdback)
            text, stream.sent_text[i] = c.text[stream.sent_text[i] : end], end
            tokens = c.token_ids[stream.sent_tokens[i] :]
            logprobs = None if c.logprobs is None else c.logprobs[stream.sent_tokens[i] :]
            stream.sent_tokens[i] = len(c.token_ids)
            completions.append(CompletionDelta(i, text, tokens, logprobs, c.finish_reason, c.stop_reason))
        return RequestDelta(out.request_id, completions, len(out.prompt_token_ids), out.finished, out.metrics)

    def _fail_all(self, error: Exception) -> None:
        for request_id, stream in list(self._streams.items()):
            stream.queue.put_nowait(error)
            if not stream.admitted.done():
                stream.admitted.set_result(None)
            self.engine.abort_request(request_id)
            for listener in self.listeners:
                listener.on_abort(self, request_id)
        self._streams.clear()
        self._pending_adds.clear()
