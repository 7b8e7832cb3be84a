"""ModelPool: the models one server serves, each loaded when a request needs it, under a memory budget.

ServerlessLLM's memory tier. Every configured model is in one state:

- ready: an engine serves it; its weights and KV cache count against the budget (`--model-memory-gb`);
- loading: a worker thread builds its engine (it counts already), then it is ready;
- evicting: its engine stops and its memory is freed (it counts until then);
- cached: its weights wait in host memory (HostCache, `--model-cache-gb`), so a load skips the disk;
- cold: only its source on disk.

A request acquires its model and holds it (a Lease) until its response has ended. A ready model that
no one must make room for is granted at once. Otherwise the request takes a ticket. A model that
becomes ready serves every ticket waiting for it at once; loads go in ticket order: a ticket's model
is loaded when it fits, evicting idle ready models (least recently used first) to make room. When the
oldest ticket that needs room can only get it from models still in use, those models take no new
requests until they drain, then go: a stream of requests for a ready model cannot starve another
model's waiting requests. A model with requests in
flight is never evicted, concurrent requests for a cold model share its one load, and loads and
evictions run in threads, never on the event loop (sutra/server/model_loading.py). A ticket that waits for room longer than
`wait_timeout_s` fails (the server answers 503); once its model's load has begun it only waits (a
load never fails a request by taking long).

A pool of one model that is always ready and never evicted (a server started with one model) costs
a counter per request.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from sutra.engine.client import EngineClient, EngineDrainingError, EngineListener
from sutra.server.host_cache import HostCache
from sutra.server.model_loading import ModelLoading, gb
from sutra.server.served_model import (
    RESIDENT,
    DrainingPool,
    ModelLoader,
    ModelState,
    NoObserver,
    PoolObserver,
    ServedModel,
    check_waiting_room,
    wait_for_grant,
)

DEFAULT_WAIT_TIMEOUT_S = 60.0


@dataclass(eq=False)
class _Ticket:
    model: ServedModel
    granted: asyncio.Future[None]


@dataclass(eq=False)
class Lease:
    """A request's hold on its model; release() once its response has ended (twice is harmless)."""

    pool: ModelPool
    model: ServedModel
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.pool._release(self.model)


@dataclass
class ModelPool(ModelLoading, DrainingPool):
    models: dict[str, ServedModel]  # in configuration order
    loader: ModelLoader | None
    default: str = ""
    memory_budget: int | None = None  # bytes for resident models; None: no limit
    cache: HostCache | None = None
    wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S
    max_waiting: int | None = None  # tickets per model; more is a 503
    observer: PoolObserver = field(default_factory=NoObserver)
    # Listeners to attach to a model's engine when it starts (metrics, the request log).
    listeners_for: Callable[[ServedModel], list[EngineListener]] = lambda _: []
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("a model pool needs at least one model")
        self.default = self.default or next(iter(self.models))
        if self.default not in self.models:
            raise ValueError(f"the default model {self.default!r} is not one of {list(self.models)}")
        self._queue: deque[_Ticket] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def single(cls, name: str, engine: EngineClient) -> ModelPool:
        """One model, always ready, never evicted: the pool of a server started with one engine."""
        model = ServedModel(
            name,
            name,
            pinned=True,
            state=ModelState.READY,
            engine=engine,
            tokenizer=engine.tokenizer,
            max_model_len=engine.max_model_len,
        )
        return cls({name: model}, None, default=name)

    # ---- lookup ----------------------------------------------------------------------------
    def get(self, name: str | None) -> ServedModel:
        """The model a request names (None: the default); KeyError for a name not served."""
        return self.models[self.default if name is None else name]

    @property
    def resident_bytes(self) -> int:
        return sum(m.footprint for m in self.models.values() if m.state in RESIDENT)

    # ---- lifecycle -------------------------------------------------------------------------
    def preload(self, name: str) -> None:
        """Load a model now, on this thread (at start-up, before the event loop runs)."""
        model = self.models[name]
        if model.state is ModelState.READY:
            return
        start = self.clock()
        self._install(model, self._loader().load(model, None))
        self.observer.on_load(name, "disk", self.clock() - start)

    def start(self) -> None:
        """On the event loop: start the engines loaded before it ran."""
        self._loop = asyncio.get_running_loop()
        self._started = True
        for model in self.models.values():
            self.observer.on_state(model.name, model.state)
            if model.engine is not None:
                self._start_engine(model)

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for model in self.models.values():
            if model.engine is not None:
                await model.engine.shutdown()

    # ---- requests --------------------------------------------------------------------------
    async def acquire(self, name: str | None) -> Lease:
        """Hold the model for a request, loading it (and making room) first if needed. Raises
        KeyError (no such model), EngineDrainingError, EngineOverloadedError (too many waiting),
        ModelUnavailableError (no room within the timeout) or ModelLoadFailedError."""
        model = self.get(name)
        if self._draining:
            raise EngineDrainingError("the server is shutting down and takes no new requests; retry later")
        if model.state is ModelState.READY and not model.reclaiming:
            self._grant(model)
            return Lease(self, model)
        check_waiting_room(model, self.max_waiting)
        ticket = _Ticket(model, asyncio.get_running_loop().create_future())
        model.waiting += 1
        self._queue.append(ticket)
        started = self.clock()
        try:
            self._pump()
            await self._wait(ticket, started + self.wait_timeout_s)
        except BaseException:
            self._withdraw(ticket)
            raise
        finally:
            model.waiting -= 1
        self.observer.on_wait(model.name, self.clock() - started)
        return Lease(self, model)

    async def _wait(self, ticket: _Ticket, deadline: float) -> None:
        def unavailable() -> str:
            return (
                f"the model `{ticket.model.name}` could not be loaded within {self.wait_timeout_s:g} s: "
                f"the memory for models ({gb(self.memory_budget)}) is held by models with requests in "
                "flight; retry later"
            )

        await wait_for_grant(ticket.model, ticket.granted, deadline, self.clock, unavailable)

    def _withdraw(self, ticket: _Ticket) -> None:
        """The waiter is gone (timed out, cancelled, or its load failed)."""
        if ticket in self._queue:
            self._queue.remove(ticket)
        elif ticket.granted.done() and not ticket.granted.cancelled() and ticket.granted.exception() is None:
            self._release(ticket.model)  # granted just as its waiter left
        self._pump()

    def _grant(self, model: ServedModel) -> None:
        model.in_flight += 1
        model.last_used = self.clock()

    def _release(self, model: ServedModel) -> None:
        model.in_flight -= 1
        model.last_used = self.clock()
        if self._queue or model.reclaiming:
            self._pump()

    # ---- scheduling ------------------------------------------------------------------------
    def _pump(self) -> None:
        """Serve tickets: grant every ticket whose model is ready (a loaded model serves all that
        wait for it at once), then, oldest first, start the loads that fit and make room for the
        oldest ticket that needs it. Runs on the event loop after every change."""
        for ticket in list(self._queue):
            model = ticket.model
            if model.state is ModelState.READY and not model.reclaiming and not ticket.granted.done():
                self._queue.remove(ticket)
                self._grant(model)
                ticket.granted.set_result(None)
        room_claimed = False
        for ticket in self._queue:
            model = ticket.model
            if (
                room_claimed
                or ticket.granted.done()
                or model.state not in (ModelState.COLD, ModelState.CACHED)
            ):
                continue
            if self._fits(model):
                self._start_load(model)
            else:
                room_claimed = True  # later tickets wait behind this one for memory
                self._reclaim_for(model)
        if not room_claimed:  # no one needs memory (any more): marked models serve again
            for model in self.models.values():
                model.reclaiming = False
        for model in self.models.values():
            if model.reclaiming and model.in_flight == 0 and model.state is ModelState.READY:
                self._start_evict(model)

    def _fits(self, model: ServedModel) -> bool:
        if self.memory_budget is None:
            return True
        # A model measured above the whole budget still loads, alone (the start-up check compares
        # estimates; a measurement can come out larger).
        need = min(model.footprint, self.memory_budget)
        return self.resident_bytes + need <= self.memory_budget

    def _reclaim_for(self, model: ServedModel) -> None:
        """Mark ready models to make room for `model`, idle ones and the least recently used first:
        they take no new requests and are evicted once idle. Marks stay until the room is no longer
        needed, so requests that keep coming for a marked model cannot keep it. Nothing more is
        marked if even every ready model would not make room (loads under way hold the rest)."""
        assert self.memory_budget is not None
        need = min(model.footprint, self.memory_budget)
        # Evicting and marked models are leaving: count them as gone when planning (not when loading).
        staying = [m for m in self.models.values() if m.state in (ModelState.LOADING, ModelState.READY)]
        committed = sum(m.footprint for m in staying if not m.reclaiming)
        candidates = [m for m in staying if m.state is ModelState.READY and not m.reclaiming and not m.pinned]
        candidates.sort(key=lambda m: (m.in_flight > 0, m.last_used))
        chosen: list[ServedModel] = []
        for candidate in candidates:
            if committed + need <= self.memory_budget:
                break
            chosen.append(candidate)
            committed -= candidate.footprint
        if committed + need > self.memory_budget:
            return
        for candidate in chosen:
            candidate.reclaiming = True

    # ---- what the server asks of it as a whole ----------------------------------------------
    @property
    def dead_reason(self) -> str | None:
        """Why no model can serve; None while one can (a cold model can: it loads)."""
        reasons = []
        for model in self.models.values():
            reason = model.engine.dead_reason if model.engine is not None else None
            if reason is None and (model.engine is not None or not model.pinned):
                return None
            reasons.append(reason or "no engine")
        return reasons[0]

    @property
    def is_draining(self) -> bool:
        return self._draining or any(
            m.engine is not None and m.engine.is_draining for m in self.models.values()
        )

    def _fail_waiting(self, error: Exception) -> int:
        tickets, self._queue = list(self._queue), deque()
        for ticket in tickets:
            if not ticket.granted.done():
                ticket.granted.set_exception(error)
        return len(tickets)
