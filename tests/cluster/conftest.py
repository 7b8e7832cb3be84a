"""One local Ray cluster for the whole test run (starting one takes seconds), and engine instances of
the tiny random model on it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from sutra.config import CacheConfig, EngineConfig, ModelConfig

# float32 and batch-invariant kernels: greedy tokens cannot depend on which requests share a step,
# so outputs spread over instances compare exactly with one engine's.
TINY_CONFIG = EngineConfig(
    ModelConfig(model="random:tiny-llama", dtype="float32", batch_invariant=True), CacheConfig(num_blocks=64)
)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    from sutra.model.cpu_kernels import cpu_kernels

    cpu_kernels()  # built (or found built) once here, not raced for by every instance
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=128 * 2**20,
    )
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def two_instances(ray_session):
    """Two instances of TINY_CONFIG, one thread each, for a test module."""
    from sutra.cluster.manager import Cluster

    cluster = Cluster.start(TINY_CONFIG, 2, threads_per_instance=1, ready_timeout_s=300)
    try:
        yield cluster
    finally:
        cluster.shutdown()
