"""ClusterModels: several models served by a cluster of instances, each model started where it is
ready soonest (ServerlessLLM), behind the same surface as the one-process ModelPool
(sutra/server/model_pool.py), so the server's routes cannot tell them apart.

- Each instance serves one model at a time and keeps the weights of those it served before in its
  host memory (sutra/cluster/model_host.py). The front end holds one ClusterClient per model, over the
  instances serving it (the model's `engine`): dispatch, live migration and failover work per model.
- A request for a model some instance serves is dispatched at once. A request for one that none
  serves waits (counted in its TTFT) while the model starts on the instance the placement picks
  (sutra/cluster/placement.py: queue + bytes / tier bandwidth, smallest first). That instance's model
  takes no new requests there; its requests move to another instance of their model by live migration
  (starting the model on an idle instance first if none serves it) when that is quicker than letting
  them finish, else finish; then the instance switches models and the requests waiting for the new one
  go to it (sutra/cluster/model_switching.py).
- A model's only instance, when its requests are left to finish, is given up only once every request
  holding the model has ended; requests for it meanwhile wait, and start it on another instance.
- A request that waits longer than `wait_timeout_s` before its model's load began fails with 503
  (ModelUnavailableError); once the load began it only waits. A failed load fails the requests waiting
  for that model, and the instance serves its previous model again.
- /v1/models shows each model's state and which instance holds it in which tier.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from sutra.cluster.client import ClusterClient
from sutra.cluster.dispatch import DEFAULT_DISPATCH
from sutra.cluster.messages import InstanceInfo, ModelHoldings
from sutra.cluster.model_switching import Host, ModelSwitching
from sutra.engine.client import EngineDrainingError, EngineListener
from sutra.model.tokenizer import Tokenizer
from sutra.server.model_pool import DEFAULT_WAIT_TIMEOUT_S, Lease
from sutra.server.served_model import (
    DrainingPool,
    ModelState,
    NoObserver,
    PoolObserver,
    ServedModel,
    check_waiting_room,
    wait_for_grant,
)

logger = logging.getLogger(__name__)
# startup: where the model's estimated startup is smallest (placement.py); lru: the instance whose
# model was used least recently, idle ones first, whatever tier the model is in there (a baseline).
PLACEMENTS = ("startup", "lru")
# live: the KV is copied (Llumnix); recompute: token-level, the destination recomputes it (ServerlessLLM).
MIGRATIONS = ("live", "recompute")


class ClusterModels(ModelSwitching, DrainingPool):
    """The model pool of a cluster (see the module docstring); built before the event loop runs,
    started on it."""

    def __init__(
        self,
        actors: dict[str, Any],
        holdings: dict[str, tuple[InstanceInfo, ModelHoldings]],  # Cluster.holdings()
        models: dict[str, ServedModel],
        tokenizers: dict[str, Tokenizer],  # of the models the instances start with
        weight_bytes: dict[str, int],  # estimated weight bytes per model, until an instance measures
        *,
        default: str = "",
        dispatch: str = DEFAULT_DISPATCH,
        wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S,
        max_waiting: int | None = None,
        placement: str = "startup",  # or "lru": the locality-blind baseline
        migration: str = "live",  # how requests move to free an instance: or "recompute"
        client_options: dict[str, Any] | None = None,
    ) -> None:
        if placement not in PLACEMENTS:
            raise ValueError(f"unknown model placement {placement!r}; choose one of {', '.join(PLACEMENTS)}")
        if migration not in MIGRATIONS:
            raise ValueError(f"unknown migration {migration!r}; choose one of {', '.join(MIGRATIONS)}")
        self.placement = placement
        self.migration = migration
        self.models = models
        self.default = default or next(iter(models))
        self.memory_budget: int | None = None  # per instance: one model at a time
        self.cache = None  # host caches are the instances'
        self.observer: PoolObserver = NoObserver()
        self.listeners_for: Callable[[ServedModel], list[EngineListener]] = lambda _: []
        self.wait_timeout_s = wait_timeout_s
        self.max_waiting = max_waiting
        self._weight_bytes = dict(weight_bytes)
        self._dispatch = dispatch
        self._client_options = client_options or {}
        self._hosts = {i: Host(i, actor, *holdings[i]) for i, actor in actors.items()}
        self._waiters: dict[str, list[asyncio.Future[None]]] = {name: [] for name in models}
        self._placing: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.num_switches = 0
        for host in self._hosts.values():  # the models the instances start with serve at once
            model = self.models[host.info.model]
            if isinstance(model.engine, ClusterClient):
                model.engine.add_instance(host.instance_id, host.actor, host.info)
            else:
                model.tokenizer = tokenizers[model.name]
                model.engine = self._new_client(host, model.tokenizer)
                model.max_model_len = host.info.max_model_len
        self._refresh_states()

    # ---- lookup ----------------------------------------------------------------------------
    def get(self, name: str | None) -> ServedModel:
        return self.models[self.default if name is None else name]

    def hosts_of(self, name: str) -> dict[str, str]:
        """Instance id -> tier for each instance holding the model: "ready" (it serves it) or
        "cache" (its host memory keeps the weights)."""
        tiers = {}
        for host in self._hosts.values():
            if host.holdings.ready == name:
                tiers[host.instance_id] = "ready"
            elif name in host.holdings.cached:
                tiers[host.instance_id] = "cache"
        return tiers

    # ---- lifecycle -------------------------------------------------------------------------
    def preload(self, name: str) -> None:
        """Nothing to do: every instance starts with a model (the cluster spreads them)."""

    def start(self) -> None:
        """On the event loop: start the clients of the models the instances started with."""
        self._loop = asyncio.get_running_loop()
        for model in self.models.values():
            if model.engine is not None:
                model.engine.listeners.extend(self.listeners_for(model))
                model.engine.start()
            self.observer.on_state(model.name, model.state)

    async def shutdown(self) -> None:
        for task in list(self._tasks) + list(self._placing.values()):
            task.cancel()
        for model in self.models.values():
            if model.engine is not None:
                await model.engine.shutdown()

    # ---- requests --------------------------------------------------------------------------
    async def acquire(self, name: str | None) -> Lease:
        """Hold the model for a request, starting it on an instance first if none serves it."""
        model = self.get(name)
        if self._draining:
            raise EngineDrainingError("the server is shutting down and takes no new requests; retry later")
        if self._serving(model):
            self._grant(model)
            return Lease(self, model)  # type: ignore[arg-type]
        check_waiting_room(model, self.max_waiting)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[model.name].append(future)
        model.waiting += 1
        started = time.monotonic()
        try:
            self._start_placing(model)
            await self._wait(model, future, started + self.wait_timeout_s)
        except BaseException:
            if future in self._waiters[model.name]:
                self._waiters[model.name].remove(future)
            elif future.done() and not future.cancelled() and future.exception() is None:
                self._release(model)  # granted just as its waiter left
            raise
        finally:
            model.waiting -= 1
        self.observer.on_wait(model.name, time.monotonic() - started)
        return Lease(self, model)  # type: ignore[arg-type]

    async def _wait(self, model: ServedModel, future: asyncio.Future[None], deadline: float) -> None:
        def unavailable() -> str:
            return (
                f"the model `{model.name}` could not be started within {self.wait_timeout_s:g} s: every "
                "instance is serving requests of other models; retry later"
            )

        await wait_for_grant(model, future, deadline, time.monotonic, unavailable)

    def _serving(self, model: ServedModel) -> bool:
        """Some instance serves the model and is not being freed of it."""
        client = model.engine
        return isinstance(client, ClusterClient) and any(
            not self._hosts[i].leaving and self._hosts[i].holdings.ready == model.name
            for i in client.instance_ids
        )

    def _grant(self, model: ServedModel) -> None:
        model.in_flight += 1
        model.last_used = time.monotonic()

    def _release(self, model: ServedModel) -> None:
        model.in_flight -= 1
        model.last_used = time.monotonic()

    def _grant_waiters(self, model: ServedModel) -> None:
        if not self._serving(model):
            return
        waiters, self._waiters[model.name] = self._waiters[model.name], []
        for future in waiters:
            if not future.done():
                self._grant(model)
                future.set_result(None)

    def _refresh_states(self) -> None:
        for name, model in self.models.items():
            tiers = self.hosts_of(name)
            if self._serving(model):
                state = ModelState.READY
            elif model.engine is not None:  # its instances are being freed of it
                state = ModelState.EVICTING
            elif name in self._placing and model.state is ModelState.LOADING:
                state = ModelState.LOADING
            elif "cache" in tiers.values():
                state = ModelState.CACHED
            else:
                state = ModelState.COLD
            model.placements = tiers
            if state is not model.state:
                model.state = state
                self.observer.on_state(name, state)

    def _fail_waiters(self, model: ServedModel, error: Exception) -> None:
        waiters, self._waiters[model.name] = self._waiters[model.name], []
        for future in waiters:
            if not future.done():
                future.set_exception(error)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- what the server asks of it as a whole ----------------------------------------------
    @property
    def dead_reason(self) -> str | None:
        if not self._hosts:
            return "every engine instance has died"
        reasons = [m.engine.dead_reason for m in self.models.values() if m.engine is not None]
        if not reasons or any(r is None for r in reasons):
            return None
        return reasons[0]

    @property
    def is_draining(self) -> bool:
        return self._draining

    def _fail_waiting(self, error: Exception) -> int:
        count = 0
        for model in self.models.values():
            count += len(self._waiters[model.name])
            self._fail_waiters(model, error)
        return count
