"""ClusterModels over real Ray instances serving three tiny random models (llama, qwen2, qwen3 shapes):
every request gets its own model's greedy output (== one local engine of that model), a request for a
model no instance serves waits while an instance switches to it (never failing), the instances report
which model they hold in which tier, a model served before comes back from an instance's host memory,
and freeing an instance moves its running requests to another instance of their model (by live or
token-level migration), their output unchanged."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from sutra.cluster.models import ClusterModels
from sutra.config import EngineConfig
from sutra.engine.client import EngineDeadError
from sutra.engine.engine import LLMEngine
from sutra.model.store.convert import convert
from sutra.sampling_params import SamplingParams
from sutra.server.served_model import ModelState, ServedModel
from tests.cluster.conftest import TINY_CONFIG

pytestmark = pytest.mark.ray

PRESETS = {"llama": "random:tiny-llama", "qwen2": "random:tiny-qwen2", "qwen3": "random:tiny-qwen3"}
CONFIGS: dict[str, EngineConfig] = {}  # name -> config of the model's checkpoint (the `configs` fixture)
PROMPT = list(range(100, 130))


@pytest.fixture(scope="module", autouse=True)
def configs(tmp_path_factory):
    """The three models as Sutra checkpoints (as served in production: a random model has no weights
    to keep in host memory, a checkpoint's are)."""
    root = tmp_path_factory.mktemp("models")
    for name, preset in PRESETS.items():
        convert(preset, root / name, dtype="float32")
        model = dataclasses.replace(TINY_CONFIG.model, model=str(root / name))
        CONFIGS[name] = dataclasses.replace(TINY_CONFIG, model=model)
    yield CONFIGS
    CONFIGS.clear()


class _Observer:
    def __init__(self) -> None:
        self.loads: list[tuple[str, str]] = []
        self.states: list[tuple[str, ModelState]] = []

    def on_state(self, name, state) -> None:
        self.states.append((name, state))

    def on_load(self, name, source, seconds) -> None:
        self.loads.append((name, source))

    def on_evict(self, name) -> None:
        pass

    def on_wait(self, name, seconds) -> None:
        pass


def _offline(name: str, prompt: list[int], max_tokens: int) -> list[int]:
    engine = LLMEngine(CONFIGS[name])
    engine.add_request("r", prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0))
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens = out.outputs[0].token_ids
    return tokens


@pytest.fixture(scope="module")
def cluster(ray_session, configs):
    """Two instances and three models: llama on i0, qwen2 on i1, qwen3 on none at the start."""
    from sutra.cluster.manager import Cluster

    cluster = Cluster.start(
        CONFIGS["llama"],
        2,
        threads_per_instance=1,
        ready_timeout_s=300,
        models={"llama": CONFIGS["llama"], "qwen2": CONFIGS["qwen2"], "qwen3": CONFIGS["qwen3"]},
        model_cache_bytes=2**30,
    )
    try:
        yield cluster
    finally:
        cluster.shutdown()


def _pool(cluster, **options) -> ClusterModels:
    """A pool over the instances as they are now (an earlier test may have switched them)."""
    served = {name: ServedModel(name, PRESETS[name], config=CONFIGS[name]) for name in PRESETS}
    holdings = cluster.holdings()
    pool = ClusterModels(
        cluster.actors,
        holdings,
        served,
        cluster.tokenizers_by_model(),
        {name: 10**6 for name in PRESETS},
        client_options={"load_refresh_s": 0.05},
        **options,
    )
    pool.observer = _Observer()
    return pool


async def _generate(pool: ClusterModels, name: str, request_id: str, prompt: list[int], max_tokens: int):
    lease = await pool.acquire(name)
    try:
        engine = lease.model.engine
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
        await engine.submit_many([(request_id, prompt, params)])
        tokens = []
        async for delta in engine.stream(request_id):
            tokens.extend(delta.completions[0].token_ids)
        return tokens
    finally:
        lease.release()


def test_instances_start_with_the_models_in_turn(cluster):
    assert [cluster.infos[i].model for i in ("i0", "i1")] == ["llama", "qwen2"]


def test_requests_get_their_models_output_across_switches(cluster):
    """The two instances take turns with three models' requests (qwen3 is not served at the start):
    every output is its model's, and the instances switched, some from host memory."""
    expected = {name: _offline(name, PROMPT, 8) for name in PRESETS}

    async def body():
        pool = _pool(cluster)
        pool.start()
        try:
            assert pool.models["qwen3"].state is ModelState.COLD
            assert pool.hosts_of("llama") == {"i0": "ready"}
            order = ["qwen3", "llama", "qwen2", "qwen3", "llama", "qwen3"]
            results = []
            for k, name in enumerate(order):  # one after another: each cold one switches an instance
                results.append((name, await _generate(pool, name, f"seq{k}", PROMPT, 8)))
            # Then all at once: requests for three models on two instances, none failing.
            jobs = [(name, f"par{k}") for k, name in enumerate(["llama", "qwen2", "qwen3"] * 2)]
            outputs = await asyncio.gather(*(_generate(pool, n, rid, PROMPT, 8) for n, rid in jobs))
            results += [(name, out) for (name, _), out in zip(jobs, outputs, strict=True)]
            holdings = {i: pool._hosts[i].holdings for i in ("i0", "i1")}
            placements = {name: m.placements for name, m in pool.models.items()}
            return results, list(pool.observer.loads), holdings, pool.num_in_flight, placements
        finally:
            await pool.shutdown()

    results, loads, holdings, in_flight, placements = asyncio.run(body())
    for name, tokens in results:
        assert tokens == expected[name], name
    assert in_flight == 0
    assert loads, "no instance switched models"
    # A model an instance served before came back from its host memory, not the disk.
    assert any(tier == "cache" for _, tier in loads)
    for holding in holdings.values():  # each instance reports its ready model, the cached ones, and
        assert holding.ready in PRESETS and holding.ready not in holding.cached  # load bandwidths
        assert set(holding.cached) <= set(PRESETS)
        assert holding.bandwidth.get("disk", 0) > 0 and holding.model_bytes[holding.ready] > 0
    assert any(h.cached and h.bandwidth.get("cache", 0) > 0 for h in holdings.values())
    # What /v1/models shows: for each instance, the tier it holds each model in.
    for name, tiers in placements.items():
        for instance_id, tier in tiers.items():
            held = holdings[instance_id]
            assert (tier == "ready" and held.ready == name) or (tier == "cache" and name in held.cached)


@pytest.mark.parametrize("migration", ["live", "recompute"])
def test_freeing_the_only_instance_of_a_busy_model_moves_its_requests(cluster, migration):
    """Freeing an instance by moving its requests, when its model runs nowhere else: the model first
    starts on the other (idle) instance, then the running request moves there, by live migration (its
    KV copied) or token-level (resumed from its tokens, the KV recomputed); its output is that of one
    uninterrupted run, and the freed instance then serves another model."""

    async def body():
        pool = _pool(cluster, migration=migration)
        pool.start()
        try:
            (busy_name,) = [m for m in ("llama", "qwen2", "qwen3") if pool.hosts_of(m).get("i0") == "ready"]
            expected = _offline(busy_name, PROMPT, 600)
            client = pool.models[busy_name].engine
            task = asyncio.create_task(_generate(pool, busy_name, "long", PROMPT, 600))
            deadline = time.monotonic() + 30
            while client.instance_of("long") is None and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert client.instance_of("long") == "i0"
            host = pool._hosts["i0"]
            host.busy = True  # chosen (as _choose marks it)
            view = pool._view(host)
            assert view.num_requests == 1 and view.move_s is not None  # i1 is idle: it can take it
            await pool._vacate(host, move=True)
            while client.instance_of("long") is None and time.monotonic() < deadline + 30:
                await asyncio.sleep(0.01)  # a token-level move is placed again: briefly held by none
            moved_to = client.instance_of("long")
            other = next(m for m in PRESETS if m != busy_name and pool.hosts_of(m).get("i0") != "ready")
            await pool._switch(host, pool.models[other])
            host.busy = False
            pool._refresh_states()
            tokens = await task
            return (
                expected,
                moved_to,
                tokens,
                pool.hosts_of(busy_name),
                pool.hosts_of(other),
                (client.migrator.num_migrated, client.failover.num_resumed),
            )
        finally:
            await pool.shutdown()

    expected, moved_to, tokens, busy_hosts, other_hosts, moves = asyncio.run(body())
    assert moved_to == "i1" and moves == ((1, 0) if migration == "live" else (0, 1))
    assert tokens == expected
    assert busy_hosts.get("i1") == "ready" and busy_hosts.get("i0") == "cache"
    assert other_hosts.get("i0") == "ready"


def test_a_dead_instance_fails_its_requests_alone_and_its_model_starts_elsewhere(ray_session, configs):
    """An instance that dies takes down only the requests it held; its model's next request starts
    it on the instance left, and a request for the other model still gets its output."""
    import ray

    from sutra.cluster.manager import Cluster

    small = Cluster.start(
        CONFIGS["llama"],
        2,
        threads_per_instance=1,
        ready_timeout_s=300,
        models={"llama": CONFIGS["llama"], "qwen2": CONFIGS["qwen2"]},
        model_cache_bytes=2**30,
    )
    expected = {name: _offline(name, PROMPT, 8) for name in ("llama", "qwen2")}

    async def body():
        served = {name: ServedModel(name, PRESETS[name], config=CONFIGS[name]) for name in ("llama", "qwen2")}
        pool = ClusterModels(
            small.actors,
            small.holdings(),
            served,
            small.tokenizers_by_model(),
            {name: 10**6 for name in served},
            client_options={"load_refresh_s": 0.05},
        )
        pool.start()
        try:
            running = asyncio.create_task(_generate(pool, "llama", "doomed", PROMPT, 600))
            client = pool.models["llama"].engine
            while client.instance_of("doomed") is None:
                await asyncio.sleep(0.01)
            ray.kill(small.actors["i0"])  # llama's only instance
            doomed = await asyncio.gather(running, return_exceptions=True)
            after = await _generate(pool, "llama", "again", PROMPT, 8)
            other = await _generate(pool, "qwen2", "other", PROMPT, 8)
            return doomed[0], after, other, pool.hosts_of("llama"), pool.dead_reason
        finally:
            await pool.shutdown()

    try:
        doomed, after, other, llama_hosts, dead_reason = asyncio.run(body())
    finally:
        small.shutdown()
    assert isinstance(doomed, EngineDeadError)
    assert after == expected["llama"] and other == expected["qwen2"]
    assert llama_hosts == {"i1": "cache"} and dead_reason is None  # i1 went back to qwen2 for the last one
