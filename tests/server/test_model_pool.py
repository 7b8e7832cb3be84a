"""The model pool's rules, with a fake loader: least-recently-used eviction under the memory budget, no
eviction of a model with requests in flight, first-come-first-served room for waiting requests (a busy
model drains for them), one shared load per cold model, loads off the event loop, the host cache
(bounded, LRU), load failures, the wait timeout, the waiting bound and draining."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from typing import Any

import pytest

from sutra.core.stats import EngineStats
from sutra.engine.client import EngineDrainingError, EngineOverloadedError
from sutra.server.host_cache import HostCache
from sutra.server.model_pool import Lease, ModelPool
from sutra.server.served_model import (
    Loaded,
    ModelLoadFailedError,
    ModelState,
    ModelUnavailableError,
    ServedModel,
)

SIZE = 10  # bytes each fake model holds


class FakeEngine:
    def __init__(self, name: str) -> None:
        self.name = name
        self.tokenizer: Any = f"tokenizer-of-{name}"
        self.max_model_len = 128
        self.listeners: list = []
        self.started = self.stopped = self.draining = False
        self.dead_reason: str | None = None

    def start(self) -> None:
        self.started = True

    async def shutdown(self) -> None:
        self.stopped = True

    @property
    def is_draining(self) -> bool:
        return self.draining

    def begin_drain(self) -> None:
        self.draining = True

    def abort_all(self, error: Exception) -> int:
        return 0

    def stats(self) -> EngineStats:
        return EngineStats()


class FakeLoader:
    def __init__(self, load_s: float = 0.0, fail: set[str] | None = None) -> None:
        self.load_s = load_s
        self.fail = fail or set()
        self.loads: Counter[tuple[str, str]] = Counter()
        self.load_threads: list[int] = []
        self.unloaded: list[str] = []

    def load(self, model: ServedModel, cached: Any | None) -> Loaded:
        self.load_threads.append(threading.get_ident())
        time.sleep(self.load_s)
        if model.name in self.fail:
            raise RuntimeError("the disk is on fire")
        assert cached in (None, f"weights-of-{model.name}")
        self.loads[model.name, "disk" if cached is None else "cache"] += 1
        return Loaded(FakeEngine(model.name), SIZE)

    async def unload(self, model: ServedModel, keep_weights: bool) -> tuple[Any, int] | None:
        assert model.in_flight == 0 and model.engine is not None
        await model.engine.shutdown()
        self.unloaded.append(model.name)
        return (f"weights-of-{model.name}", SIZE) if keep_weights else None


def make_pool(
    names: str = "abc", budget_models: int | None = 2, cache_models: int = 0, **kwargs: Any
) -> tuple[ModelPool, FakeLoader]:
    loader = kwargs.pop("loader", None) or FakeLoader()
    models = {n: ServedModel(n, f"src-{n}", footprint=SIZE) for n in names}
    pool = ModelPool(
        models,
        loader,
        memory_budget=None if budget_models is None else budget_models * SIZE,
        cache=HostCache(cache_models * SIZE) if cache_models else None,
        **kwargs,
    )
    return pool, loader


def states(pool: ModelPool) -> dict[str, str]:
    return {name: m.state.value for name, m in pool.models.items()}


async def use(pool: ModelPool, name: str) -> None:
    (await pool.acquire(name)).release()


async def settle() -> None:
    """Let evictions (tasks) finish."""
    for _ in range(20):
        await asyncio.sleep(0)


def test_least_recently_used_idle_model_is_evicted_to_fit():
    async def main() -> None:
        pool, loader = make_pool(cache_models=3)
        pool.start()
        await use(pool, "a")
        await use(pool, "b")
        assert states(pool) == {"a": "ready", "b": "ready", "c": "cold"}
        await use(pool, "a")  # now b is the least recently used
        await use(pool, "c")
        await settle()
        assert states(pool) == {"a": "ready", "b": "cached", "c": "ready"}
        assert pool.resident_bytes == 2 * SIZE
        await use(pool, "b")  # from the host cache, evicting a (c is more recent)
        await settle()
        assert states(pool) == {"a": "cached", "b": "ready", "c": "ready"}
        assert loader.loads == Counter(
            {("a", "disk"): 1, ("b", "disk"): 1, ("c", "disk"): 1, ("b", "cache"): 1}
        )
        assert loader.unloaded == ["b", "a"]

    asyncio.run(main())


def test_a_model_in_flight_is_never_evicted_and_the_wait_times_out():
    async def main() -> None:
        pool, loader = make_pool(budget_models=1, wait_timeout_s=0.2)
        pool.start()
        lease = await pool.acquire("a")
        start = time.monotonic()
        with pytest.raises(ModelUnavailableError, match="could not be loaded within 0.2 s"):
            await pool.acquire("b")
        assert time.monotonic() - start >= 0.2
        assert states(pool)["a"] == "ready" and loader.unloaded == []
        lease.release()
        await use(pool, "b")  # room now: a goes
        assert states(pool) == {"a": "cold", "b": "ready", "c": "cold"}
        assert pool.num_in_flight == 0

    asyncio.run(main())


def test_waiting_requests_are_served_in_order_and_a_busy_model_drains_for_them():
    async def main() -> None:
        pool, _ = make_pool(budget_models=1)
        pool.start()
        first_a = await pool.acquire("a")
        order: list[str] = []

        async def request(name: str) -> None:
            lease = await pool.acquire(name)
            order.append(name)
            await asyncio.sleep(0.01)
            lease.release()

        waiting_b = asyncio.create_task(request("b"))
        await settle()
        assert pool.models["a"].reclaiming  # b waits for a's memory: a takes no new request
        later_a = asyncio.create_task(request("a"))
        await settle()
        assert order == [] and pool.models["a"].in_flight == 1
        first_a.release()
        await asyncio.gather(waiting_b, later_a)
        assert order == ["b", "a"]  # a's later request did not starve b
        assert pool.models["a"].loads == 2

    asyncio.run(main())


def test_concurrent_requests_for_a_cold_model_share_one_load_off_the_event_loop():
    async def main() -> None:
        loader = FakeLoader(load_s=0.3)
        pool, _ = make_pool(loader=loader)
        pool.start()
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticking = asyncio.create_task(ticker())
        leases = await asyncio.gather(*(pool.acquire("b") for _ in range(5)))
        ticking.cancel()
        assert loader.loads == Counter({("b", "disk"): 1})
        assert ticks >= 10  # the loop ran while the model loaded
        assert threading.get_ident() not in loader.load_threads
        assert pool.models["b"].in_flight == 5 and pool.models["b"].engine.started
        for lease in leases:
            lease.release()
        assert pool.num_in_flight == 0

    asyncio.run(main())


def test_a_load_under_way_is_waited_for_whatever_the_timeout():
    async def main() -> None:
        pool, _ = make_pool(loader=FakeLoader(load_s=0.5), wait_timeout_s=0.05)
        pool.start()
        await use(pool, "b")
        assert states(pool)["b"] == "ready"

    asyncio.run(main())


def test_the_host_cache_is_bounded_least_recently_evicted_first():
    async def main() -> None:
        pool, loader = make_pool(names="abcd", budget_models=1, cache_models=2)
        pool.start()
        for name in "abcd":
            await use(pool, name)
            await settle()
        assert states(pool) == {"a": "cold", "b": "cached", "c": "cached", "d": "ready"}
        assert pool.cache is not None and pool.cache.used_bytes == 2 * SIZE
        await use(pool, "b")
        await use(pool, "a")
        await settle()
        assert loader.loads[("b", "cache")] == 1 and loader.loads[("a", "disk")] == 2

    asyncio.run(main())


def test_without_a_cache_evicted_models_go_cold():
    async def main() -> None:
        pool, loader = make_pool(budget_models=1)
        pool.start()
        await use(pool, "a")
        await use(pool, "b")
        await settle()
        await use(pool, "a")
        assert states(pool)["b"] == "cold" and loader.loads[("a", "disk")] == 2

    asyncio.run(main())


def test_a_failed_load_fails_its_waiters_and_is_tried_again():
    async def main() -> None:
        loader = FakeLoader(load_s=0.05, fail={"b"})
        pool, _ = make_pool(loader=loader)
        pool.start()
        results = await asyncio.gather(*(pool.acquire("b") for _ in range(3)), return_exceptions=True)
        assert all(isinstance(r, ModelLoadFailedError) and "disk is on fire" in str(r) for r in results)
        assert states(pool)["b"] == "cold" and pool.num_in_flight == 0
        loader.fail.clear()
        await use(pool, "b")
        assert states(pool)["b"] == "ready"

    asyncio.run(main())


def test_the_number_of_waiting_requests_is_bounded():
    async def main() -> None:
        pool, _ = make_pool(loader=FakeLoader(load_s=0.2), max_waiting=2)
        pool.start()
        waiters = [asyncio.create_task(pool.acquire("b")) for _ in range(2)]
        await settle()
        with pytest.raises(EngineOverloadedError, match="limit 2"):
            await pool.acquire("b")
        for lease in await asyncio.gather(*waiters):
            lease.release()

    asyncio.run(main())


def test_draining_fails_waiting_requests_and_refuses_new_ones():
    async def main() -> None:
        pool, _ = make_pool(budget_models=1)
        pool.start()
        lease = await pool.acquire("a")
        waiting = asyncio.create_task(pool.acquire("b"))
        await settle()
        assert pool.num_in_flight == 2
        pool.begin_drain()
        with pytest.raises(EngineDrainingError):
            await waiting
        with pytest.raises(EngineDrainingError):
            await pool.acquire("a")
        assert pool.is_draining and pool.models["a"].engine.draining
        lease.release()
        assert pool.num_in_flight == 0

    asyncio.run(main())


def test_lookup_default_and_single_pool():
    pool, _ = make_pool(default="b")
    assert pool.get(None).name == "b" and pool.get("c").name == "c"
    with pytest.raises(KeyError):
        pool.get("nope")
    engine = FakeEngine("solo")
    single = ModelPool.single("solo", engine)

    async def main() -> Lease:
        single.start()
        return await single.acquire(None)

    lease = asyncio.run(main())
    model = single.models["solo"]
    assert model.pinned and model.state is ModelState.READY and model.in_flight == 1 and engine.started
    lease.release()
    lease.release()  # twice is harmless
    assert model.in_flight == 0
    assert single.dead_reason is None
    engine.dead_reason = "stopped"
    assert single.dead_reason == "stopped"


def test_host_cache_rules():
    cache = HostCache(25)
    assert cache.put("a", "A", 10) == [] and cache.put("b", "B", 10) == []
    assert cache.put("c", "C", 10) == ["a"]  # the least recently put goes first
    assert cache.put("huge", "H", 26) == [] and "huge" not in cache  # larger than the whole cache
    assert cache.take("b") == "B" and cache.take("b") is None
    assert cache.used_bytes == 10 and cache.names() == ["c"]
    with pytest.raises(ValueError):
        HostCache(-1)


def test_the_cache_keeps_what_requests_wait_for():
    cache = HostCache(20)
    cache.put("a", "A", 10)
    cache.put("b", "B", 10)
    assert cache.put("c", "C", 10, keep={"a"}) == ["b"]
    assert cache.put("d", "D", 10, keep={"a", "c"}) == [] and "d" not in cache
    assert cache.names() == ["a", "c"]


def test_a_loaded_model_serves_every_request_waiting_for_it_before_it_goes():
    async def main() -> None:
        pool, loader = make_pool(budget_models=1)
        pool.start()
        busy = await pool.acquire("a")
        served: list[str] = []

        async def request(name: str) -> None:
            lease = await pool.acquire(name)
            served.append(name)
            await asyncio.sleep(0.02)
            lease.release()

        tasks = []
        for name in "bcbcab":  # interleaved, as a bursty mix of clients sends them
            tasks.append(asyncio.create_task(request(name)))
            await asyncio.sleep(0)
        await settle()
        busy.release()
        await asyncio.gather(*tasks)
        assert served == ["b", "b", "b", "c", "c", "a"]  # one load per model, oldest need first
        assert sum(loader.loads.values()) == 4 and pool.num_in_flight == 0

    asyncio.run(main())
