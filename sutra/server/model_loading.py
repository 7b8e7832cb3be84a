"""Loading and evicting the models of a ModelPool (sutra/server/model_pool.py), each in a worker
thread, never on the event loop: a load that fails fails the requests waiting for its model; an
evicted model's weights go to the host cache (`--model-cache-gb`) when one is set. A mixin of ModelPool.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from sutra.server.served_model import Loaded, ModelLoader, ModelLoadFailedError, ModelState, ServedModel

if TYPE_CHECKING:
    from sutra.server.model_pool import ModelPool

logger = logging.getLogger("sutra.server.model_pool")


class ModelLoading:
    def _start_load(self: ModelPool, model: ServedModel) -> None:
        cached = self.cache.take(model.name) if self.cache is not None else None
        self._set_state(model, ModelState.LOADING)
        self._spawn(self._load(model, cached))

    async def _load(self: ModelPool, model: ServedModel, cached: Any | None) -> None:
        source = "disk" if cached is None else "cache"
        start = self.clock()
        try:
            loaded = await asyncio.to_thread(self._loader().load, model, cached)
        except Exception as e:
            logger.exception("loading the model %s (%s) failed", model.name, model.source)
            self._set_state(model, ModelState.COLD)
            error = ModelLoadFailedError(f"the model `{model.name}` could not be loaded: {e}")
            for ticket in [t for t in self._queue if t.model is model]:
                self._queue.remove(ticket)
                if not ticket.granted.done():
                    ticket.granted.set_exception(error)
            self._pump()
            return
        self._install(model, loaded)
        seconds = self.clock() - start
        logger.info("model %s ready (from %s) in %.2f s", model.name, source, seconds)
        self.observer.on_load(model.name, source, seconds)
        self._pump()

    def _install(self: ModelPool, model: ServedModel, loaded: Loaded) -> None:
        model.engine = loaded.engine
        model.tokenizer = loaded.engine.tokenizer
        model.max_model_len = loaded.engine.max_model_len
        if loaded.footprint > (self.memory_budget or loaded.footprint):
            logger.warning(
                "the model %s holds %s, more than --model-memory-gb (%s): it is served alone",
                model.name,
                gb(loaded.footprint),
                gb(self.memory_budget),
            )
        model.footprint = loaded.footprint
        model.keep = loaded.keep
        model.loads += 1
        model.last_used = self.clock()
        if self._started:
            self._start_engine(model)
        self._set_state(model, ModelState.READY)

    def _start_engine(self: ModelPool, model: ServedModel) -> None:
        assert model.engine is not None
        model.engine.listeners.extend(self.listeners_for(model))
        model.engine.start()
        if self._draining:
            model.engine.begin_drain()

    def _start_evict(self: ModelPool, model: ServedModel) -> None:
        model.reclaiming = False
        self._set_state(model, ModelState.EVICTING)
        self._spawn(self._evict(model))

    async def _evict(self: ModelPool, model: ServedModel) -> None:
        kept: tuple[Any, int] | None = None
        try:
            kept = await self._loader().unload(model, self.cache is not None)
        except Exception:
            logger.exception("evicting the model %s failed; its weights are not kept", model.name)
        model.engine = None
        model.keep = None
        state = ModelState.COLD
        if kept is not None and self.cache is not None:
            payload, nbytes = kept
            wanted = {t.model.name for t in self._queue}  # a model requests wait for stays
            for dropped in self.cache.put(model.name, payload, nbytes, keep=wanted):
                if dropped != model.name:
                    self._set_state(self.models[dropped], ModelState.COLD)
            if model.name in self.cache:
                state = ModelState.CACHED
        self._set_state(model, state)
        logger.info("model %s evicted (now %s)", model.name, state.value)
        self.observer.on_evict(model.name)
        self._pump()

    def _spawn(self: ModelPool, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _set_state(self: ModelPool, model: ServedModel, state: ModelState) -> None:
        model.state = state
        self.observer.on_state(model.name, state)

    def _loader(self: ModelPool) -> ModelLoader:
        if self.loader is None:
            raise RuntimeError("this model pool has no loader: its models cannot be loaded")
        return self.loader


def gb(nbytes: int | None) -> str:
    return "no limit" if nbytes is None else f"{nbytes / 2**30:.2f} GB"
