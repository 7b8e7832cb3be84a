"""ModelHost: the models one engine instance holds, in ServerlessLLM's tiers, and its model switch.

An instance of a cluster that serves several models serves one of them at a time (its engine: the
"ready" tier, as a GPU holds one model), keeps the weights of the models it served before in host memory
(a HostCache of `--model-cache-gb`: the "cache" tier) and can load any other from its source (the "disk"
tier). A switch stops the engine (the front end has moved or finished its requests first), puts its
weights in the host cache, and builds the next model's engine from the cache or the disk.

Every load is timed: the bytes of weights over the seconds to a built engine, per tier, is the
bandwidth the front end's placement estimates startups with (sutra/cluster/placement.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from sutra.cluster.messages import ModelHoldings
from sutra.config import EngineConfig
from sutra.engine.async_engine import AsyncEngine
from sutra.errors import InvalidRequestError
from sutra.model.runtime_weights import storage_bytes, tensors_in
from sutra.server.engine_loader import EngineLoader
from sutra.server.host_cache import HostCache
from sutra.server.served_model import ServedModel

logger = logging.getLogger(__name__)


@dataclass
class Switched:
    """How a switch went: the new engine (not started) and where its weights came from."""

    engine: AsyncEngine
    tier: str  # "cache" or "disk"
    seconds: float


@dataclass
class ModelHost:
    configs: dict[str, EngineConfig]  # every model the cluster serves, by name
    cache: HostCache
    max_waiting_requests: int | None = None
    current: ServedModel | None = None
    bandwidth: dict[str, float] = field(default_factory=dict)  # tier -> bytes/s of its latest load
    model_bytes: dict[str, int] = field(default_factory=dict)  # weight bytes of each model loaded here

    def __post_init__(self) -> None:
        self._loader = EngineLoader(self.max_waiting_requests, keep_weights=self.cache.capacity_bytes > 0)

    def load(self, name: str) -> Switched:
        """Build `name`'s engine (from the host cache if it is there); blocking, for a worker thread.
        The engine serving before must have been put away (evict)."""
        if name not in self.configs:
            raise InvalidRequestError(f"this cluster serves no model named {name!r}")
        if self.current is not None:
            raise RuntimeError(f"the model {self.current.name} is still loaded here")
        model = ServedModel(name, name, config=self.configs[name])
        cached = self.cache.take(name)
        start = time.perf_counter()
        loaded = self._loader.load(model, cached)
        seconds = time.perf_counter() - start
        assert isinstance(loaded.engine, AsyncEngine)
        model.engine, model.keep = loaded.engine, loaded.keep
        self.current = model
        tier = "disk" if cached is None else "cache"
        nbytes = storage_bytes(tensors_in(loaded.engine.engine.runner.model))
        self.model_bytes[name] = nbytes
        if seconds > 0 and nbytes > 0:
            self.bandwidth[tier] = nbytes / seconds
        rate = nbytes / max(seconds, 1e-9) / 1e9
        logger.info("model %s loaded from %s in %.2f s (%.2f GB/s)", name, tier, seconds, rate)
        return Switched(loaded.engine, tier, seconds)

    async def evict(self) -> None:
        """Stop the current engine and keep its weights in the host cache (when they fit)."""
        model, self.current = self.current, None
        if model is None:
            return
        kept = await self._loader.unload(model, self.cache.capacity_bytes > 0)
        if kept is not None:
            payload, nbytes = kept
            self.cache.put(model.name, payload, nbytes)

    async def switch(self, name: str) -> tuple[Switched, Exception | None]:
        """Evict the current model and load `name` in its place. Returns the engine now loaded and
        None, or, should the load fail, the model evicted loaded back (from the host cache, quickly)
        and the error. Raises when there is nothing to load back either."""
        previous = None if self.current is None else self.current.name
        await self.evict()
        try:
            return await asyncio.to_thread(self.load, name), None
        except Exception as e:
            if previous is None or self.current is not None:
                raise
            logger.exception("loading the model %s failed; %s is loaded back", name, previous)
            return await asyncio.to_thread(self.load, previous), e

    def holdings(self, instance_id: str) -> ModelHoldings:
        return ModelHoldings(
            instance_id,
            None if self.current is None else self.current.name,
            tuple(self.cache.names()),
            dict(self.bandwidth),
            dict(self.model_bytes),
        )
