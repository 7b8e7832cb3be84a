"""Cluster: start or join Ray, create the engine instances as actors, wait until they are ready, and
shut them down.

On a small machine Ray's defaults oversubscribe it: every process would get torch's default thread
count (or 1, as Ray sets OMP_NUM_THREADS=1 in actors), the raylet prestarts a worker per CPU it is
told of, and the object store takes 30% of RAM. So the instances reserve no Ray CPUs (`num_cpus=0`)
and get their thread count explicitly (the cores split evenly by default), and a local Ray is started
small: no dashboard, a 512 MiB object store (only small deltas and stats cross it), usage stats off.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError

from sutra.cluster.client import ClusterClient, summarize_error
from sutra.cluster.dispatch import DEFAULT_DISPATCH, DispatchPolicy
from sutra.cluster.instance import InstanceActor
from sutra.cluster.messages import InstanceInfo
from sutra.config import EngineConfig
from sutra.errors import SutraError
from sutra.model.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DEFAULT_OBJECT_STORE_BYTES = 512 * 2**20
# Building an engine loads (and on a first run converts) the model: minutes on a busy small machine.
READY_TIMEOUT_S = 600.0
RPC_TIMEOUT_S = 60.0


class ClusterStartError(SutraError):
    """Ray could not be started or joined, or an engine instance did not become ready."""


def local_cpu_count() -> int:
    """The cores this process may run on (a container's limit, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads_per_instance(num_instances: int, num_cpus: int | None = None) -> int:
    """The cores split evenly between the instances, at least one thread each."""
    return max(1, (num_cpus or local_cpu_count()) // num_instances)


def connect_ray(address: str | None = None, object_store_memory: int = DEFAULT_OBJECT_STORE_BYTES) -> bool:
    """Join the Ray cluster at `address`, or start a small local one; returns whether this call
    connected (so the caller disconnects, and a local cluster stops, at shutdown). A process already
    connected (tests share one cluster) stays as it is."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        if address:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        else:
            # "local": a new cluster even if RAY_ADDRESS names another (say, a test's).
            ray.init(
                address="local",
                num_cpus=local_cpu_count(),
                include_dashboard=False,
                log_to_driver=False,
                object_store_memory=object_store_memory,
                logging_level=logging.WARNING,
            )
    except Exception as e:
        where = f"join the Ray cluster at {address}" if address else "start a local Ray cluster"
        raise ClusterStartError(f"could not {where}: {e}") from e
    return True


class Cluster:
    """N engine instances as Ray actors, ready to serve; `client()` is the EngineClient over them."""

    def __init__(
        self,
        actors: dict[str, Any],
        infos: dict[str, InstanceInfo],
        tokenizer: Tokenizer,
        owns_ray: bool,
        make_actor: Any = None,  # () -> actor handle of a new instance, for add_instance
    ) -> None:
        self.actors = actors
        self.infos = infos
        self.tokenizer = tokenizer
        self._owns_ray = owns_ray
        self._make_actor = make_actor
        self._closed = False

    @classmethod
    def start(
        cls,
        engine_config: EngineConfig,
        num_instances: int,
        *,
        threads_per_instance: int | None = None,
        ray_address: str | None = None,
        max_waiting_requests: int | None = None,
        ready_timeout_s: float = READY_TIMEOUT_S,
        object_store_memory: int = DEFAULT_OBJECT_STORE_BYTES,
    ) -> Cluster:
        """Start (or join) Ray and `num_instances` instances of `engine_config` (each with its own
        KV cache of the configured size); returns once every instance has built its engine."""
        if num_instances < 1:
            raise ValueError(f"the number of instances must be at least 1, got {num_instances}")
        if threads_per_instance is not None and threads_per_instance < 1:
            raise ValueError(f"threads per instance must be at least 1, got {threads_per_instance}")
        threads = threads_per_instance or default_threads_per_instance(num_instances)
        owns_ray = connect_ray(ray_address, object_store_memory)
        actor_class = ray.remote(num_cpus=0, max_restarts=0)(InstanceActor)

        def make_actor(instance_id: str) -> Any:
            return actor_class.remote(instance_id, engine_config, threads, max_waiting_requests)

        actors: dict[str, Any] = {}
        try:
            for k in range(num_instances):
                actors[f"i{k}"] = make_actor(f"i{k}")
            infos = _wait_ready(actors, ready_timeout_s)
            first = next(iter(actors.values()))
            tokenizer = ray.get(first.tokenizer.remote(), timeout=RPC_TIMEOUT_S)
        except BaseException:
            _kill(actors)
            if owns_ray:
                ray.shutdown()
            raise
        logger.info(
            "%d engine instances ready, %d threads each: %s",
            num_instances,
            threads,
            ", ".join(f"{i} (pid {info.pid} on {info.node})" for i, info in infos.items()),
        )
        return cls(actors, infos, tokenizer, owns_ray, make_actor)

    def add_instance(self, ready_timeout_s: float = READY_TIMEOUT_S) -> tuple[str, Any, InstanceInfo]:
        """Start one more instance with the same model and settings; returns (id, actor, info) once
        it is ready (ClusterClient.add_instance then puts it to work)."""
        if self._make_actor is None or self._closed:
            raise ClusterStartError("this cluster cannot start instances")
        instance_id = f"i{len(self.actors)}"
        actor = self._make_actor(instance_id)
        try:
            info = _wait_ready({instance_id: actor}, ready_timeout_s)[instance_id]
        except BaseException:
            _kill({instance_id: actor})
            raise
        self.actors[instance_id] = actor
        self.infos[instance_id] = info
        return instance_id, actor, info

    async def add_instance_async(self) -> tuple[str, Any, InstanceInfo]:
        """add_instance off the event loop (building an engine takes seconds)."""
        return await asyncio.to_thread(self.add_instance)

    def client(self, dispatch: DispatchPolicy | str = DEFAULT_DISPATCH, **options: Any) -> ClusterClient:
        """The EngineClient over the instances (options: ClusterClient's timeouts and periods)."""
        return ClusterClient(self.actors, self.infos, self.tokenizer, dispatch, **options)

    def shutdown(self) -> None:
        """Kill the instances, and disconnect from Ray (stopping it, if it was started here)."""
        if self._closed:
            return
        self._closed = True
        _kill(self.actors)
        if self._owns_ray:
            ray.shutdown()


def _wait_ready(actors: dict[str, Any], timeout_s: float) -> dict[str, InstanceInfo]:
    refs = {instance_id: actor.info.remote() for instance_id, actor in actors.items()}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    ready_set = set(ready)
    infos: dict[str, InstanceInfo] = {}
    for instance_id, ref in refs.items():
        if ref not in ready_set:
            raise ClusterStartError(
                f"engine instance {instance_id} was not ready after {timeout_s:g} s (is the machine "
                "short of memory or cores for this many instances?)"
            )
        try:
            info = ray.get(ref, timeout=RPC_TIMEOUT_S)
        except (RayError, GetTimeoutError) as e:
            raise ClusterStartError(
                f"engine instance {instance_id} failed to start: {summarize_error(e)}"
            ) from None
        if isinstance(info, SutraError):  # a user error, e.g. no such model: raised as it is
            raise info
        infos[instance_id] = info
    return infos


def _kill(actors: dict[str, Any]) -> None:
    for instance_id, actor in actors.items():
        try:
            ray.kill(actor)
        except Exception as e:  # already dead, or Ray is going away: nothing left to stop
            logger.debug("killing engine instance %s: %s", instance_id, e)
