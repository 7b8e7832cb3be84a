"""AsyncEngine: the asyncio face of LLMEngine that the server uses.

One engine loop task owns the LLMEngine. Requests and aborts from handlers are queued and applied
between steps; each step runs in one dedicated thread (torch releases the GIL, so the event loop keeps
serving HTTP meanwhile). After a step the loop turns each request's progress into a delta and hands it
to that request's asyncio queue, so handlers never read engine state while a step mutates it.

No single event can stop the loop: a failing step fails the requests in it, a failing add, delta or
abort fails that request alone, and a failing listener is logged and skipped. Should the loop end
anyway, every waiting stream gets an error at once and the engine reports itself dead (`dead_reason`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from sutra.core.request import RequestSpec
from sutra.core.stats import EngineStats, InstanceLoad
from sutra.engine.client import (
    EngineDeadError,
    EngineListener,
    EngineOverloadedError,
    PromptRequest,
    RequestDelta,
    RequestMoved,
)
from sutra.engine.engine import LLMEngine
from sutra.engine.engine_stream import EngineStream
from sutra.engine.step_log import StepLog
from sutra.engine.streams import StreamHub
from sutra.errors import InvalidRequestError, SutraError
from sutra.outputs import RequestOutput
from sutra.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
T = TypeVar("T")

# After a step that could schedule nothing (every waiting client throttled, nothing fits), the loop
# sleeps until an add or abort arrives, or this long, so that a reopening rate window is noticed.
IDLE_POLL_S = 0.05


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    spec: RequestSpec
    arrival_time: float


class AsyncEngine(StreamHub):
    """The local EngineClient (sutra/engine/client.py)."""

    _streams: dict[str, EngineStream]

    def __init__(self, engine: LLMEngine, max_waiting_requests: int | None = None) -> None:
        super().__init__()
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.max_waiting_requests = max_waiting_requests
        self.listeners: list[EngineListener] = []
        self.step_log: StepLog | None = None  # see log_steps
        self._step: Callable[[], list[RequestOutput]] = engine.step
        self._pending_adds: list[_Add] = []
        self._pending_aborts: list[str] = []
        self._wakeup = asyncio.Event()
        # Held while engine state is changed outside a step: adds and aborts on the event loop, and
        # between_steps() work on the step thread (which steps themselves never overlap).
        self._between_steps = asyncio.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sutra-step")
        self._task: asyncio.Task[None] | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sutra-engine-loop")
            self._task.add_done_callback(_retrieve_exception)

    async def shutdown(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])  # whatever the loop ended with was logged by it
        self._executor.shutdown(wait=True)
        if self.step_log is not None:
            self.step_log.close()

    def log_steps(self, log: StepLog) -> None:
        """Write every step's batch and cost to `log` (`sutra serve --step-log`)."""
        self.step_log = log
        self.engine.record_step_slices = True
        self._step = functools.partial(log.run_step, self.engine)

    @property
    def max_request_tokens(self) -> int:
        return self.engine.max_request_tokens

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def load_summary(self) -> InstanceLoad:
        """The instance's load (Llumnix freeness), taken on the step thread: between two steps, never
        while one changes the queues."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.engine.scheduler.load_summary, self._draining)

    # ---- requests --------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return self.engine.scheduler.num_waiting + len(self._pending_adds)

    async def submit(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        spec: RequestSpec = RequestSpec(),
    ) -> None:
        """Validate and queue a request; raises InvalidRequestError or EngineOverloadedError at once."""
        await self.submit_many([(request_id, prompt_token_ids, params)], spec)

    async def submit_many(self, requests: list[PromptRequest], spec: RequestSpec = RequestSpec()) -> None:
        """Validate and queue (request id, prompt token ids, params) triples, all or none: if one is
        invalid, or they do not all fit under the waiting bound, nothing is queued."""
        self._check_accepting()
        limit = self.max_waiting_requests
        if limit is not None and len(requests) > limit:
            # Retrying cannot help: the batch would not fit even into an empty queue.
            raise InvalidRequestError(
                f"the request has {len(requests)} prompts but the server queues at most {limit} "
                f"requests at a time; send at most {limit} prompts per request",
                param="prompt",
            )
        for request_id, prompt_token_ids, params in requests:
            self.engine.validate(prompt_token_ids, params)
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
        if limit is not None and self.num_waiting + len(requests) > limit:
            raise EngineOverloadedError(
                f"the server has {self.num_waiting} requests waiting (limit {limit}); retry later"
            )
        now = time.monotonic()
        for request_id, prompt_token_ids, params in requests:
            self._streams[request_id] = EngineStream.opened(params, spec, prompt_token_ids, now)
            self._pending_adds.append(_Add(request_id, prompt_token_ids, params, spec, now))
        self._wakeup.set()

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, **submit_kwargs: Any
    ) -> AsyncIterator[RequestDelta]:
        """submit() and stream() in one."""
        await self.submit(request_id, prompt_token_ids, params, **submit_kwargs)
        async for delta in self.stream(request_id):
            yield delta

    def abort(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            self._notify_abort(request_id)  # while listeners can still look the request up
            del self._streams[request_id]
            self._close(request_id, stream, None)  # wakes a reader, which then ends
            self._pending_aborts.append(request_id)
            self._wakeup.set()

    # ---- requests that move to and from other instances (sutra/engine/migration_endpoint.py) -----
    async def between_steps(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) on the step thread, so between two steps: never while one changes state."""
        async with self._between_steps:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def beside_steps(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) in a worker thread while a step may run, with no add, abort or
        between_steps() work applied meanwhile: for reading state that no step changes (the KV and
        output state of a parked request, which only an abort or a hand-off ends)."""
        async with self._between_steps:
            return await asyncio.to_thread(fn, *args)

    def stream_position(self, request_id: str) -> tuple[int, int]:
        """(characters, tokens) of the request's single completion its stream has handed out."""
        stream = self._streams[request_id]
        return stream.sent_text[0], stream.sent_tokens[0]

    def hand_off(self, request_id: str, destination: str) -> bool:
        """The request lives on `destination` now: its stream here ends with RequestMoved. False if
        its reader had already left (aborted): then the destination must drop it too."""
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return False
        self._close(request_id, stream, RequestMoved(request_id, destination))
        return True

    def take_over(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        spec: RequestSpec,
        sent_text: int,
        sent_tokens: int,
    ) -> None:
        """Open the stream of a request arriving from another instance, continuing where the source's
        stream stopped. Call just before the engine adopts it; `wake()` after."""
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._streams[request_id] = EngineStream.opened(
            params, spec, prompt_token_ids, time.monotonic(), sent=(sent_text, sent_tokens)
        )
        self._streams[request_id].admitted.set_result(None)

    def drop_stream(self, request_id: str) -> None:
        """Forget a stream opened by take_over whose request never arrived."""
        self._streams.pop(request_id, None)

    def wake(self) -> None:
        self._wakeup.set()

    # ---- the loop --------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        idle = False
        try:
            while True:
                waiting = time.perf_counter()
                await self._wait_for_work(idle)
                if self.step_log is not None:
                    self.step_log.waited(time.perf_counter() - waiting)
                idle = False
                try:
                    async with self._between_steps:  # no migration operation runs meanwhile
                        added = self._apply_pending()
                    if added:
                        # The estimate simulates the scheduler forward (bounded): off the event loop.
                        estimates = await loop.run_in_executor(self._executor, self._estimates, added)
                        self._publish_estimates(added, estimates)
                    if not self.engine.has_unfinished_requests():
                        continue
                    try:
                        outputs = await loop.run_in_executor(self._executor, self._step)
                    except Exception as e:  # a bug in a step must not take the server down
                        logger.exception("engine step failed; failing the requests in flight")
                        self._fail_all(EngineDeadError(f"the engine step failed: {e}"))
                        continue
                    idle = self.engine.last_step_num_scheduled_tokens == 0
                    self._publish_step(outputs)
                except Exception as e:
                    # Each event above is guarded; this is the net under them. Nothing may wait
                    # forever on an event that went wrong, so the requests in flight fail.
                    logger.exception("engine loop event failed; failing the requests in flight")
                    self._fail_all(EngineDeadError(f"the engine failed: {type(e).__name__}: {e}"))
        except BaseException as e:
            self._die(e)
            raise

    async def _wait_for_work(self, idle: bool) -> None:
        if self._pending_adds or self._pending_aborts:
            return
        if not self.engine.has_unfinished_requests():
            self._wakeup.clear()
            await self._wakeup.wait()
        elif idle:
            # The last step scheduled nothing and nothing has changed since: stepping again at once
            # would only spin a core. No set() is lost between the check above and clear(): both run
            # on the event loop. A timer sets the event rather than asyncio.wait_for, which before
            # Python 3.12 can swallow a cancellation (shutdown) that coincides with the event.
            self._wakeup.clear()
            timer = asyncio.get_running_loop().call_later(IDLE_POLL_S, self._wakeup.set)
            try:
                await self._wakeup.wait()
            finally:
                timer.cancel()

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
                    spec=add.spec,
                    arrival_time=add.arrival_time,
                    prompt_token_ids=add.prompt_token_ids,
                )
                added.append(add.request_id)
            except Exception as e:  # that request alone fails; the abort it queues is a no-op
                if not isinstance(e, SutraError):
                    logger.exception("adding request %s failed", add.request_id)
                self._end_stream(add.request_id, e)
        for request_id in aborts:
            try:
                self.engine.abort_request(request_id)
            except Exception:
                logger.exception("aborting request %s failed", request_id)
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

    def _publish_step(self, outputs: list[RequestOutput]) -> None:
        """Turn the step's outputs into deltas, tell the listeners, then hand each to its stream."""
        deltas: list[RequestDelta] = []
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted while the step ran; the abort is pending
            if out.error is not None:  # this request alone failed in the step
                del self._streams[out.request_id]
                self._close(out.request_id, stream, out.error)
                continue
            try:
                deltas.append(stream.next_delta(out))
            except Exception as e:  # that request alone fails
                logger.exception("publishing the output of request %s failed", out.request_id)
                self._end_stream(out.request_id, EngineDeadError(f"the engine failed on this request: {e}"))
        for listener in self.listeners:
            try:
                listener.on_step(self, deltas)
            except Exception:
                logger.exception("engine listener %s failed on a step; skipped", type(listener).__name__)
        for delta in deltas:
            stream = self._streams.get(delta.request_id)
            if stream is None:
                continue  # a listener aborted it
            if delta.finished:
                del self._streams[delta.request_id]
            stream.queue.put_nowait(delta)

    def _notify_abort(self, request_id: str) -> None:
        for listener in self.listeners:
            try:
                listener.on_abort(self, request_id)
            except Exception:
                logger.exception("engine listener %s failed on an abort; skipped", type(listener).__name__)

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self._streams):
            self._end_stream(request_id, error)
        self._pending_adds.clear()

    def _end_stream(self, request_id: str, error: BaseException) -> None:
        """The request ends with `error` (its reader raises it); the engine lets it go between steps."""
        stream = self._streams.get(request_id)
        if stream is None:
            return
        self._notify_abort(request_id)  # while listeners can still look the request up
        del self._streams[request_id]
        self._close(request_id, stream, error)
        self._pending_aborts.append(request_id)
        self._wakeup.set()

    def _die(self, cause: BaseException) -> None:
        """The loop is ending: no waiter may hang, and new requests are refused from now on."""
        if isinstance(cause, asyncio.CancelledError):
            self._dead_reason = "the engine has shut down"
        else:
            self._dead_reason = f"the engine loop stopped ({type(cause).__name__}: {cause})"
            logger.critical("the engine loop stopped; failing every request in flight", exc_info=cause)
        error = EngineDeadError(self._dead_reason)
        for request_id, stream in list(self._streams.items()):
            self._notify_abort(request_id)
            self._close(request_id, stream, error)
        self._streams.clear()
        self._pending_adds.clear()


def _retrieve_exception(task: asyncio.Task[None]) -> None:
    # The loop logs how it ended; retrieving the exception keeps asyncio from logging it again.
    if not task.cancelled():
        task.exception()
