"""InstanceActor: one engine instance (an LLMEngine and its AsyncEngine) in a Ray actor process.

A plain class: the manager decorates it with `ray.remote` where it creates the actors, so this module
imports no Ray and can be tested in-process. Ray runs it as an async actor (its methods are
coroutines), so every method runs on the actor's event loop, the loop the AsyncEngine lives on; the
engine's steps run on the AsyncEngine's step thread as they do in a single-process server.

Progress leaves the actor by long-poll: per request, one task reads `AsyncEngine.stream(rid)` and
another waits for its admission, both appending `Update`s to an outbox; `poll(ack, timeout_s)` drops
what the front end has acknowledged and returns the rest, waiting up to timeout_s for something to
return. One poll carries every update of a
step, so the RPC count follows steps, not tokens.

Errors a user can cause (SutraError: an invalid request, a full queue) are returned, not raised, so
the front end re-raises the same type with the same message; Ray would wrap a raised one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import time
from typing import Any

import torch

from sutra.cluster.messages import (
    InstanceInfo,
    InstanceReport,
    InstanceRole,
    MigrationReply,
    ModelHoldings,
    ModelSwitch,
    PullReply,
    Update,
    UpdateKind,
)
from sutra.cluster.model_host import ModelHost
from sutra.cluster.pull import MAX_OPEN_PULLS, PULL_WATERMARK, RemoteSource, pull
from sutra.config import EngineConfig
from sutra.core.migration import watermark_blocks
from sutra.core.request import RequestSpec
from sutra.core.stats import EngineStats, InstanceLoad
from sutra.engine.async_engine import AsyncEngine
from sutra.engine.client import EngineDeadError, EngineOverloadedError, PromptRequest, RequestMoved
from sutra.engine.engine import LLMEngine
from sutra.engine.migration_endpoint import MigrationEndpoint
from sutra.errors import InvalidRequestError, ModelLoadError, SutraError
from sutra.model.tokenizer import Tokenizer
from sutra.sampling_params import SamplingParams
from sutra.server.host_cache import HostCache

logger = logging.getLogger(__name__)
MIGRATION_OPS = frozenset(
    {
        "out_begin",
        "out_stage",
        "out_pause",
        "out_commit",
        "out_abort",
        "out_hand_off",
        "out_hand_over",
        "out_hand_off_abort",
        "in_open",
        "in_stage",
        "in_commit",
        "in_abort",
    }
)


class InstanceActor:
    """One engine instance; see the module docstring. Not thread-safe: Ray calls it on one loop."""

    def __init__(
        self,
        instance_id: str,
        engine_config: EngineConfig,
        num_threads: int,
        max_waiting_requests: int | None = None,
        role: InstanceRole = "mixed",
        models: dict[str, EngineConfig] | None = None,
        model_name: str = "",
        model_cache_bytes: int = 0,
    ) -> None:
        """With `models` (name -> config, every model of the cluster), the instance starts serving
        `model_name` and can switch to any other (switch_model); its host cache keeps the weights of
        those it served before (ModelHost)."""
        # Ray sets OMP_NUM_THREADS=1 in actor processes, which torch would take as its default: the
        # thread count is always explicit here.
        torch.set_num_threads(num_threads)
        self.instance_id = instance_id
        self.role = role
        self._init_error: SutraError | None = None
        self.host: ModelHost | None = None
        self._switching = False
        self._outbox: list[Update] = []
        self._seq = 0
        self._outbox_ready = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()  # per request: its reader and its admission
        self._reading: set[str] = set()  # requests whose reader runs
        self._aborted: set[str] = set()  # of those, the ones aborted here
        try:
            if models:
                configs = {name: _instance_config(c, num_threads, role) for name, c in models.items()}
                self.host = ModelHost(configs, HostCache(model_cache_bytes), max_waiting_requests)
                self._install(self.host.load(model_name).engine, model_name)
            else:
                engine = LLMEngine(_instance_config(engine_config, num_threads, role))
                self._install(AsyncEngine(engine, max_waiting_requests=max_waiting_requests), model_name)
        except SutraError as e:  # e.g. no such model: info() reports it as it is, rather than the
            self._init_error = e  # actor dying with it wrapped in Ray's text; the manager then kills it

    def _install(self, engine: AsyncEngine, model_name: str) -> None:
        """Serve with this engine. Its loop-bound parts bind on first use, and it starts in the
        first async call: the actor's loop runs only inside its async methods."""
        self._async = engine
        self.engine = engine.engine
        self._migration = MigrationEndpoint(self._async)
        if self.role == "decode":  # a pull never takes the room its own requests grow into
            inbox = self.engine.migration_target.inbox
            inbox.min_free_blocks = watermark_blocks(self.engine.kv.pool.num_blocks, PULL_WATERMARK)
            inbox.max_open = MAX_OPEN_PULLS
        self._started = False
        self._info = InstanceInfo(
            instance_id=self.instance_id,
            max_model_len=self.engine.max_model_len,
            max_request_tokens=self.engine.max_request_tokens,
            block_size=self.engine.config.cache.block_size,
            num_threads=torch.get_num_threads(),
            pid=os.getpid(),
            node=socket.gethostname(),
            role=self.role,
            model=model_name,
        )

    def _engine(self) -> AsyncEngine:
        if self._switching:
            raise EngineOverloadedError(f"instance {self.instance_id} is switching models")
        if not self._started:
            self._async.start()
            self._started = True
        return self._async

    # ---- what the front end reads once -------------------------------------------------------------
    async def info(self) -> InstanceInfo | SutraError:
        """Answers once the engine is built (the manager waits on it for readiness), or with the
        user error that stopped it being built."""
        return self._init_error or self._info

    async def holdings(self) -> ModelHoldings:
        """The models this instance holds, by tier (a single-model instance: its one, ready)."""
        if self.host is None:
            return ModelHoldings(self.instance_id, self._info.model or None, (), {}, {})
        return self.host.holdings(self.instance_id)

    async def switch_model(self, name: str) -> ModelSwitch | SutraError:
        """Serve the model `name` from now on, in place of the current one, which must hold no
        request (the front end moves them away or lets them finish first); its weights go to the
        host cache. Returns an error the front end may retry later (requests still here) or report."""
        if self.host is None or self.role != "mixed":
            return InvalidRequestError(f"instance {self.instance_id} serves one model")
        if self._switching:
            return EngineOverloadedError(f"instance {self.instance_id} is switching models already")
        busy = self._async.num_in_flight + len(self._reading)
        if busy:
            return EngineOverloadedError(f"instance {self.instance_id} still holds {busy} requests")
        if name == self._info.model:
            return ModelSwitch(self._info, self.host.holdings(self.instance_id), "ready", 0.0)
        self._switching = True
        try:
            for task in list(self._tasks):
                task.cancel()
            self._outbox.clear()  # every request here has ended: nothing is left to tell
            switched, error = await self.host.switch(name)
            self._install(switched.engine, name if error is None else self._info.model)
        except Exception as e:  # neither model could be loaded: this instance can serve nothing
            logger.exception("instance %s could not switch to the model %s", self.instance_id, name)
            self._init_error = EngineDeadError(f"instance {self.instance_id} failed to switch models: {e}")
            return self._init_error
        finally:
            self._switching = False
        failure = (
            None if error is None else ModelLoadError(f"the model `{name}` could not be loaded: {error}")
        )
        return ModelSwitch(
            self._info, self.host.holdings(self.instance_id), switched.tier, switched.seconds, failure
        )

    async def tokenizer(self) -> Tokenizer:
        """The instance's tokenizer, so the front end tokenizes exactly as the engine does without
        loading the model's weights."""
        return self.engine.tokenizer

    # ---- requests ----------------------------------------------------------------------------------
    async def submit_many(
        self, requests: list[PromptRequest], spec: RequestSpec = RequestSpec()
    ) -> SutraError | None:
        """Queue the requests, all or none; returns the error that refused them, if one did."""
        engine = self._engine()
        try:
            await self._compile_specs([params for _, _, params in requests])
            await engine.submit_many(requests, spec)
        except SutraError as e:
            return e
        for request_id, _, _ in requests:
            self._start_forwarding(request_id, admission=True)
        return None

    async def _compile_specs(self, params: list[SamplingParams]) -> None:
        """Compile the requests' structured-output specs (or find them cached) in the compiler's
        threads. The front end compiled them too, but a compiled grammar stays in its process: here
        each spec compiles once more, and is cached for this instance's later requests. Without this
        the engine would compile it on this actor's event loop, stalling every request's progress.
        InvalidRequestError, naming the field, for a spec over the limits or too slow to compile."""
        compiler = self.engine.runner.structured
        specs = [p.structured_outputs for p in params if p.structured_outputs is not None]
        for spec in {spec.cache_key(): spec for spec in specs}.values():  # n prompts may share one
            await compiler.prepare(spec)

    async def _warm_spec(self, params: SamplingParams) -> None:
        """Compile an arriving request's spec before it is adopted, so the step thread does not wait
        on the compile when it builds the request's matcher. Best effort: a failure is the runner's
        to report, when it compiles the spec itself."""
        try:
            await self._compile_specs([params])
        except SutraError as e:
            logger.warning("the spec of an arriving request did not compile on %s: %s", self.instance_id, e)

    def _start_forwarding(self, request_id: str, admission: bool) -> None:
        self._reading.add(request_id)
        coros = [self._forward(request_id)] + ([self._admission(request_id)] if admission else [])
        for coro in coros:
            task = asyncio.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def abort(self, request_ids: list[str]) -> None:
        engine = self._engine()
        for request_id in request_ids:
            if request_id in self._reading:
                self._aborted.add(request_id)
            engine.abort(request_id)

    async def poll(self, ack: int, timeout_s: float) -> list[Update]:
        """Every update after `ack` (the last seq the caller received), waiting up to timeout_s when
        there is none. Updates up to `ack` are dropped: the caller has them."""
        if not self._switching:
            self._engine()
        if self._outbox and self._outbox[0].seq <= ack:
            self._outbox = [u for u in self._outbox if u.seq > ack]
        if not self._outbox:
            self._outbox_ready.clear()
            # asyncio.wait, not wait_for: before Python 3.12 wait_for can swallow a cancellation.
            waiter = asyncio.ensure_future(self._outbox_ready.wait())
            try:
                await asyncio.wait([waiter], timeout=timeout_s)
            finally:
                waiter.cancel()
        return list(self._outbox)

    async def _forward(self, request_id: str) -> None:
        """Feed one request's deltas, and how it ended, into the outbox."""
        finished = parked = False
        try:
            async for delta in self._async.stream(request_id):
                finished = delta.finished
                self._post(request_id, "delta", delta=delta)
                # The step that sampled its first token parked it (before its outputs were published).
                request = self.engine.scheduler.parked.get(request_id) if self.role == "prefill" else None
                if not parked and request is not None:
                    parked = True
                    self._post(request_id, "parked", num_tokens=request.num_computed_tokens)
            if not finished:
                self._post(request_id, "ended")  # aborted here
        except RequestMoved as moved:
            self._post(request_id, "moved", destination=moved.destination)
        except SutraError as e:
            if request_id in self._aborted:  # aborted before its reader started: not in flight
                self._post(request_id, "ended")
            else:
                self._post(request_id, "error", error=e)
        except Exception as e:  # not a user error: it may not even pickle, so it travels as text
            logger.exception("request %s failed on instance %s", request_id, self.instance_id)
            self._post(request_id, "error", error=EngineDeadError(f"the engine failed on this request: {e}"))
        finally:
            self._reading.discard(request_id)
            self._aborted.discard(request_id)

    async def _admission(self, request_id: str) -> None:
        """Post the request's admission, with its completion estimate, once the engine takes it: the
        engine publishes estimates before the step's outputs, so this comes before its deltas."""
        engine = self._async
        seconds = await engine.estimated_finish(request_id)
        if seconds is None:
            estimate = None
        else:  # this host's clock, as are the request's metrics: the two compare wherever it runs
            estimate = engine.estimate_of(request_id) or (seconds, time.monotonic())
        self._post(request_id, "admitted", estimate=estimate)

    # ---- live migration (sutra/engine/migration_endpoint.py; the driver is cluster/migrator.py) -----
    async def migration(self, op: str, *args: Any) -> MigrationReply:
        """One step of a migration, as this instance's MigrationEndpoint names it."""
        if op not in MIGRATION_OPS:
            raise ValueError(f"unknown migration step {op!r}")
        self._engine()
        if op == "in_commit":  # args: migration id, the MovedRequest, its last blocks
            await self._warm_spec(args[1].sampling_params)
        try:
            value = await getattr(self._migration, op)(*args)
        except SutraError as e:  # MigrationAborted, a KV layout mismatch, a bad request id
            return MigrationReply(error=e)
        if op == "in_commit":  # the request runs here now: its progress leaves by this outbox
            self._start_forwarding(args[1].request_id, admission=False)
        return MigrationReply(value)

    async def pull(self, source: Any, source_id: str, request_id: str, migration_id: str) -> PullReply:
        """Take a request parked on prefill instance `source` (an actor handle; cluster/pull.py)."""
        self._engine()
        return await pull(
            RemoteSource(source, source_id),
            self._migration,
            request_id,
            migration_id,
            self.instance_id,
            on_adopted=lambda: self._start_forwarding(request_id, admission=False),
            before_adopt=lambda moved: self._warm_spec(moved.sampling_params),
        )

    async def unpark(self, request_ids: list[str]) -> int:
        """Decode these parked requests here (no decode instance is left); returns how many were
        still parked. Whatever a hand-off has claimed meanwhile is left to it."""
        scheduler = self.engine.scheduler
        claimed = self.engine.migration_source.outgoing.values()

        def unpark() -> int:
            moving = {m.request_id for m in claimed}
            ids = [rid for rid in request_ids if rid in scheduler.parked and rid not in moving]
            for rid in ids:
                scheduler.unpark(rid)
            return len(ids)

        count = await self._engine().between_steps(unpark)
        self._async.wake()
        return count

    async def migration_candidate(self) -> str | None:
        """The request to move when this instance must shed load: the decoding one that holds the
        fewest blocks (cheapest to move; Llumnix's default)."""
        return await self._engine().between_steps(self.engine.migration_source.candidate)

    def _post(self, request_id: str, kind: UpdateKind, **fields: Any) -> None:
        self._seq += 1
        self._outbox.append(Update(self._seq, request_id, kind, **fields))
        self._outbox_ready.set()

    # ---- state -------------------------------------------------------------------------------------
    async def stats(self) -> EngineStats:
        return self._engine().stats()

    async def load(self) -> InstanceLoad:
        """The load summary, taken between two steps."""
        return await self._engine().load_summary()

    async def report(self) -> InstanceReport:
        """Load, stats and liveness in one call (what the front end refreshes every ~100 ms)."""
        if self._init_error is not None:  # a failed model switch left it without an engine
            dead = EngineStats.total([])
            return InstanceReport(InstanceLoad(0, 0, 0, 0, 0, draining=True), dead, 0, str(self._init_error))
        engine = self._engine()
        # Blocks reserved for a migration whose source went silent (died) past the lease come back.
        await engine.between_steps(self.engine.migration_target.expire)
        load = await engine.load_summary()
        return InstanceReport(load, engine.stats(), engine.num_in_flight, engine.dead_reason)

    async def begin_drain(self) -> None:
        """Take no new requests (submit_many returns EngineDrainingError); the load reports this
        instance as draining, so dispatch sends it nothing. Requests in flight carry on."""
        self._engine().begin_drain()

    async def num_in_flight(self) -> int:
        return self._engine().num_in_flight

    async def shutdown(self) -> None:
        """Stop the engine loop; requests in flight end with EngineDeadError."""
        for task in list(self._tasks):
            task.cancel()
        await self._async.shutdown()


def _instance_config(config: EngineConfig, num_threads: int, role: InstanceRole) -> EngineConfig:
    return dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, num_threads=num_threads),
        scheduler=dataclasses.replace(config.scheduler, hand_off_after_prefill=role == "prefill"),
    )
