"""What a model pool holds for each model (ServedModel), its states, and the parts a pool is built
from: the loader that builds and stops engines, the observer told of every change (metrics)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from sutra.engine.client import EngineClient, EngineDrainingError, EngineOverloadedError
from sutra.errors import SutraError
from sutra.model.tokenizer import Tokenizer


class ModelState(str, Enum):
    COLD = "cold"
    CACHED = "cached"
    LOADING = "loading"
    READY = "ready"
    EVICTING = "evicting"


# States whose memory counts against the budget.
RESIDENT = (ModelState.LOADING, ModelState.READY, ModelState.EVICTING)


class ModelUnavailableError(SutraError):
    """The model could not be made ready in time: the models using the memory did not drain."""


class ModelLoadFailedError(SutraError):
    """Loading the model raised; the requests waiting for it fail, the next request tries again."""


@dataclass
class Loaded:
    """A loader's result: an engine (not started yet) and the memory it holds."""

    engine: EngineClient
    footprint: int  # bytes: weights + KV cache, measured
    keep: Any = None  # what the loader needs at eviction to keep the weights in the host cache


class ModelLoader(Protocol):
    def load(self, model: ServedModel, cached: Any | None) -> Loaded:
        """Build the model's engine, from `cached` (a host-cache payload) if given, else from its
        source. Runs in a worker thread."""
        ...

    async def unload(self, model: ServedModel, keep_weights: bool) -> tuple[Any, int] | None:
        """Stop model.engine and free its memory; with keep_weights, return (payload, bytes) for the
        host cache, or None if the weights cannot be kept."""
        ...


class PoolObserver(Protocol):
    """Told about every change (metrics); must be cheap."""

    def on_state(self, name: str, state: ModelState) -> None: ...

    def on_load(self, name: str, source: str, seconds: float) -> None: ...

    def on_evict(self, name: str) -> None: ...

    def on_wait(self, name: str, seconds: float) -> None: ...


class NoObserver:
    def on_state(self, name: str, state: ModelState) -> None:
        pass

    def on_load(self, name: str, source: str, seconds: float) -> None:
        pass

    def on_evict(self, name: str) -> None:
        pass

    def on_wait(self, name: str, seconds: float) -> None:
        pass


@dataclass(eq=False)
class ServedModel:
    name: str
    source: str  # for people: the --model source
    config: Any = None  # what the loader builds the engine from (an EngineConfig)
    footprint: int = 0  # bytes when resident: estimated until the first load, then measured
    max_model_len: int | None = None
    pinned: bool = False  # never evicted (a server of one model)
    state: ModelState = ModelState.COLD
    engine: EngineClient | None = None  # set while ready (and while evicting)
    tokenizer: Tokenizer | None = None  # kept once known, so /tokenize needs no load
    keep: Any = None  # the loader's, from load to unload
    last_used: float = 0.0
    in_flight: int = 0  # leases held: requests from their grant until their response ended
    waiting: int = 0  # tickets: requests waiting for this model
    reclaiming: bool = False  # ready, but to be evicted once idle: takes no new requests
    loads: int = 0
    # In a cluster of several models (sutra/cluster/models.py): instance id -> the tier it holds the
    # model in ("ready": it serves it; "cache": its host memory keeps the weights).
    placements: dict[str, str] = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        return self.name


def check_waiting_room(model: ServedModel, max_waiting: int | None) -> None:
    """EngineOverloadedError when `max_waiting` requests wait for the model already."""
    if max_waiting is not None and model.waiting >= max_waiting:
        raise EngineOverloadedError(
            f"{model.waiting} requests are waiting for the model `{model.name}` (limit "
            f"{max_waiting}); retry later"
        )


async def wait_for_grant(
    model: ServedModel,
    granted: asyncio.Future[None],
    deadline: float,
    clock: Callable[[], float],
    unavailable: Callable[[], str],
) -> None:
    """Until a waiting request is granted its model (raising what failed the load), or, once
    `deadline` passes with the model's load not begun, ModelUnavailableError(unavailable()): a load
    under way is always waited for, never failed for taking long."""
    while True:
        loading = model.state is ModelState.LOADING
        timeout = None if loading else max(0.0, deadline - clock())
        done, _ = await asyncio.wait([granted], timeout=timeout)
        if done:
            granted.result()
            return
        if model.state is ModelState.LOADING:
            continue  # its load began meanwhile: from now on it only waits
        raise ModelUnavailableError(unavailable())


class DrainingPool:
    """What a server asks of a model pool as a whole when it shuts down: a mixin of ModelPool (one
    process) and ClusterModels (a cluster of instances), each saying how its waiting requests fail."""

    models: dict[str, ServedModel]
    _draining: bool
    _loop: asyncio.AbstractEventLoop | None

    def _fail_waiting(self, error: Exception) -> int:
        """End every request waiting for a model with `error`; returns how many."""
        raise NotImplementedError

    @property
    def num_in_flight(self) -> int:
        """Requests holding or waiting for a model."""
        return sum(m.in_flight + m.waiting for m in self.models.values())

    def begin_drain(self) -> None:
        """Refuse new requests from now on; waiting ones fail with EngineDrainingError. Only sets flags
        (and wakes the event loop), so a signal handler may call it."""
        self._draining = True
        for model in self.models.values():
            if model.engine is not None:
                model.engine.begin_drain()
        if self._loop is not None and not self._loop.is_closed():
            error = EngineDrainingError("the server is shutting down and takes no new requests; retry later")
            self._loop.call_soon_threadsafe(self._fail_waiting, error)

    def abort_all(self, error: Exception) -> int:
        """End every request in flight and every waiting one with `error`; returns how many."""
        ended = self._fail_waiting(error)
        for model in self.models.values():
            if model.engine is not None:
                ended += model.engine.abort_all(error)
        return ended
