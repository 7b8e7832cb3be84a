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

from sutra.cluster.client import ClusterClient
from sutra.cluster.dispatch import DEFAULT_DISPATCH, DispatchPolicy
from sutra.cluster.instance import InstanceActor
from sutra.cluster.messages import InstanceInfo, InstanceRole, ModelHoldings
from sutra.cluster.rpc import summarize_error
from sutra.config import EngineConfig
from sutra.errors import SutraError
from sutra.model.tokenizer import Tokenizer
from sutra.structured.compiler import compiler_for

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
        make_actor: Any = None,  # (instance id, role) -> actor handle of a new instance, for add_instance
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
        prefill_instances: int = 0,
        decode_instances: int = 0,
        prefill_threads: int | None = None,
        decode_threads: int | None = None,
        models: dict[str, EngineConfig] | None = None,
        model_cache_bytes: int = 0,
    ) -> Cluster:
        """Start (or join) Ray and `num_instances` instances of `engine_config` (each with its own
        KV cache of the configured size); returns once every instance has built its engine.

        Disaggregated (DistServe): num_instances 0 and `prefill_instances` instances that run prompts
        and `decode_instances` that take the requests over after their first token, each role with
        its own thread count (default: threads_per_instance).

        Several models (`models`: name -> config; then `engine_config` only says how the first is
        served): the instances start with the models in turn, the first on i0, and can
        switch between them, each with a host cache of `model_cache_bytes` for the weights of those
        it served before (sutra/cluster/model_host.py)."""
        if models and (prefill_instances or decode_instances):
            raise ValueError("several models are served by colocated instances, not disaggregated ones")
        disaggregated = prefill_instances > 0 or decode_instances > 0
        if disaggregated and (num_instances or prefill_instances < 1 or decode_instances < 1):
            raise ValueError(
                "disaggregated serving needs at least one prefill and one decode instance and no "
                f"mixed ones, got {prefill_instances} prefill, {decode_instances} decode, {num_instances} mixed"
            )
        if not disaggregated and num_instances < 1:
            raise ValueError(f"the number of instances must be at least 1, got {num_instances}")
        for name, value in (
            ("threads per instance", threads_per_instance),
            ("prefill threads", prefill_threads),
            ("decode threads", decode_threads),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        total = num_instances + prefill_instances + decode_instances
        threads = threads_per_instance or default_threads_per_instance(total)
        role_threads: dict[InstanceRole, int] = {
            "mixed": threads,
            "prefill": prefill_threads or threads,
            "decode": decode_threads or threads,
        }
        owns_ray = connect_ray(ray_address, object_store_memory)
        actor_class = ray.remote(num_cpus=0, max_restarts=0)(InstanceActor)

        names = list(models or {})

        def make_actor(instance_id: str, role: InstanceRole) -> Any:
            if not names:
                return actor_class.remote(
                    instance_id, engine_config, role_threads[role], max_waiting_requests, role
                )
            name = names[int(instance_id[1:]) % len(names)]  # i0 the first (default) model, i1 the next...
            return actor_class.remote(
                instance_id,
                engine_config,
                role_threads[role],
                max_waiting_requests,
                role,
                models=models,
                model_name=name,
                model_cache_bytes=model_cache_bytes,
            )

        plan: list[tuple[str, InstanceRole]] = (
            [(f"p{k}", "prefill") for k in range(prefill_instances)]
            + [(f"d{k}", "decode") for k in range(decode_instances)]
            + [(f"i{k}", "mixed") for k in range(num_instances)]
        )
        actors: dict[str, Any] = {}
        try:
            for instance_id, role in plan:
                actors[instance_id] = make_actor(instance_id, role)
            infos = _wait_ready(actors, ready_timeout_s)
            first = next(iter(actors.values()))
            tokenizer = ray.get(first.tokenizer.remote(), timeout=RPC_TIMEOUT_S)
        except BaseException:
            _kill(actors)
            if owns_ray:
                ray.shutdown()
            raise
        logger.info(
            "%d engine instances ready: %s",
            total,
            ", ".join(
                f"{i} ({info.role}, {info.num_threads} threads, pid {info.pid} on {info.node})"
                for i, info in infos.items()
            ),
        )
        # The server compiles each spec here before it dispatches the request (sutra/server/
        # structured.py), to refuse a bad one at once: with the configured limits, as the instances do.
        compiler_for(tokenizer, None, engine_config.structured)
        return cls(actors, infos, tokenizer, owns_ray, make_actor)

    def add_instance(
        self, role: InstanceRole | None = None, ready_timeout_s: float = READY_TIMEOUT_S
    ) -> tuple[str, Any, InstanceInfo]:
        """Start one more instance with the same model and settings; returns (id, actor, info) once
        it is ready (ClusterClient.add_instance then puts it to work). Its role defaults to mixed,
        or decode in a disaggregated cluster (decoding holds requests longest)."""
        if self._make_actor is None or self._closed:
            raise ClusterStartError("this cluster cannot start instances")
        roles = {info.role for info in self.infos.values()}
        if role is None:
            role = "decode" if "decode" in roles else "mixed"
        if (role == "mixed") != ("mixed" in roles):
            raise ValueError(
                f"a {role} instance does not fit a cluster of {', '.join(sorted(roles))} instances"
            )
        prefix = {"mixed": "i", "prefill": "p", "decode": "d"}[role]
        instance_id = f"{prefix}{sum(i.startswith(prefix) for i in self.actors)}"
        actor = self._make_actor(instance_id, role)
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

    def holdings(self) -> dict[str, tuple[InstanceInfo, ModelHoldings]]:
        """Each instance with the models it holds, by tier (a cluster of several models)."""
        refs = {i: (actor.info.remote(), actor.holdings.remote()) for i, actor in self.actors.items()}
        result = {}
        for i, (info, holdings) in refs.items():
            self.infos[i] = ray.get(info, timeout=RPC_TIMEOUT_S)  # the model it serves may have changed
            result[i] = (self.infos[i], ray.get(holdings, timeout=RPC_TIMEOUT_S))
        return result

    def tokenizers_by_model(self) -> dict[str, Tokenizer]:
        """The tokenizer of each model some instance serves (a cluster of several models)."""
        tokenizers: dict[str, Tokenizer] = {}
        for instance_id, info in self.infos.items():
            if info.model not in tokenizers:
                ref = self.actors[instance_id].tokenizer.remote()
                tokenizers[info.model] = ray.get(ref, timeout=RPC_TIMEOUT_S)
        return tokenizers

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
