"""ClusterClient: the EngineClient (sutra/engine/client.py) in front of many engine instances on Ray.

The server talks to it exactly as to a local AsyncEngine. Tokenization happens here, with the
instances' own tokenizer (no weights are loaded in this process); everything else is the instances'.

- Submit: the dispatch policy picks an instance from the latest loads (read from every instance about
  every 100 ms) and all the prompts of one HTTP request go there together. An instance that refuses
  because it is full or draining, or turns out dead, is skipped for the next one; a user error (an
  invalid request) is raised as the instance raised it.
- Progress: one pump task per instance long-polls it and routes each update to its request's stream by
  request id, whichever instance sent it, so a request that moves between instances keeps its stream.
  Listeners see each poll's deltas as they arrive (sutra/cluster/routing.py).
- Loads: read from every instance about every 100 ms, for dispatch, the migration trigger and
  hand-offs (sutra/cluster/loads.py).
- Abort: routed to the instance that holds the request, batched per instance.
- Failure: an instance that dies (or stops answering) is dropped from dispatch and its requests
  resume on other instances by recompute, their streams carrying on (cluster/failover.py); those
  that cannot (n > 1, no instance left) end with EngineDeadError. The client is dead when every
  instance is.

Every wait on an instance has a timeout, so a hung instance cannot hang the server.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ray.exceptions import ActorDiedError, RayActorError

from sutra.cluster.affinity import PrefixAffinity, prefix_hashes
from sutra.cluster.dispatch import (
    DEFAULT_DISPATCH,
    DispatchPolicy,
    DispatchRequest,
    NoInstanceError,
    make_dispatch_policy,
)
from sutra.cluster.endings import RequestEndings
from sutra.cluster.failover import Failover, Progress, instance_died_error
from sutra.cluster.handoff import HandOffs
from sutra.cluster.loads import LOAD_REFRESH_S, REBALANCE_EVERY, REPORT_TIMEOUT_S, InstanceLoads
from sutra.cluster.messages import InstanceInfo, InstanceReport, InstanceRole, Update
from sutra.cluster.migrator import Migrator
from sutra.cluster.routing import POLL_WAIT_S, UpdateRouting
from sutra.cluster.rpc import call, summarize_error
from sutra.core.request import RequestSpec
from sutra.engine.client import (
    EngineDeadError,
    EngineListener,
    EngineOverloadedError,
    PromptRequest,
)
from sutra.engine.streams import Stream, StreamHub
from sutra.model.tokenizer import Tokenizer

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Control calls (submit, abort): generous, since a busy instance answers only between its GIL turns.
RPC_TIMEOUT_S = 30.0


@dataclass
class _Instance:
    instance_id: str
    actor: Any  # a Ray actor handle of InstanceActor
    info: InstanceInfo
    report: InstanceReport | None = None
    dead_reason: str | None = None
    pending_aborts: list[str] = field(default_factory=list)
    abort_task: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self.dead_reason is None


@dataclass(kw_only=True)
class _Stream(Stream):
    instance_id: str | None = None  # the instance holding the request, once submitted there
    # Updates sent by another instance than the holder: a move's destination can report progress
    # before the source's "moved" arrives over the other pump. Replayed in order once it does.
    early: list[tuple[str, Update]] = field(default_factory=list)  # (sender, update)
    progress: Progress | None = None  # what its reader got, to resume from (None: n > 1, cannot)
    relocating: bool = False  # aborted on its instance to resume elsewhere by recompute (relocate)


class ClusterClient(RequestEndings, UpdateRouting, InstanceLoads, StreamHub):
    """The EngineClient over InstanceActors; see the module docstring. One client per set of
    instances: each instance's updates are consumed by whoever polls it."""

    _streams: dict[str, _Stream]
    _call = staticmethod(call)

    def __init__(
        self,
        actors: Mapping[str, Any],
        infos: Mapping[str, InstanceInfo],
        tokenizer: Tokenizer,
        dispatch: DispatchPolicy | str = DEFAULT_DISPATCH,
        *,
        rpc_timeout_s: float = RPC_TIMEOUT_S,
        report_timeout_s: float = REPORT_TIMEOUT_S,
        load_refresh_s: float = LOAD_REFRESH_S,
        poll_wait_s: float = POLL_WAIT_S,
    ) -> None:
        if not actors:
            raise ValueError("a cluster client needs at least one instance")
        super().__init__()
        self._instances = {i: _Instance(i, actor, infos[i]) for i, actor in actors.items()}
        self.tokenizer = tokenizer
        # Every instance runs the same model and config; the smallest limits are the safe ones.
        self.max_model_len = min(info.max_model_len for info in infos.values())
        self._max_request_tokens = min(info.max_request_tokens for info in infos.values())
        self.block_size = min(info.block_size for info in infos.values())
        self.dispatch = make_dispatch_policy(dispatch) if isinstance(dispatch, str) else dispatch
        self.listeners: list[EngineListener] = []
        self.rpc_timeout_s = rpc_timeout_s
        self.report_timeout_s = report_timeout_s
        self.load_refresh_s = load_refresh_s
        self.poll_wait_s = poll_wait_s
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.migrator = Migrator(self)
        self.affinity = PrefixAffinity()
        self.failover = Failover(self)
        self.handoffs = HandOffs(self)
        self.load_reads = 0  # load reads started (hand-offs tell which reads show their pulls)
        self.rebalance_every = REBALANCE_EVERY

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Start polling the instances and reading their loads (on the running event loop)."""
        if self._tasks or self._closed:
            return
        loop = asyncio.get_running_loop()
        for inst in self._instances.values():
            self._tasks.append(loop.create_task(self._pump(inst), name=f"sutra-pump-{inst.instance_id}"))
        self._tasks.append(loop.create_task(self._refresh_loop(), name="sutra-load-refresh"))

    async def shutdown(self) -> None:
        """Stop polling; requests in flight end with EngineDeadError and are aborted on their
        instances. The instances themselves belong to whoever created them (see manager.py)."""
        if self._closed:
            return
        self._closed = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        await self.failover.close()
        await self.handoffs.close()
        # Aborts already queued still go out: their requests would otherwise run on for nobody.
        flushing = [inst.abort_task for inst in self._instances.values() if inst.abort_task is not None]
        if flushing:
            await asyncio.wait(flushing)
        self._dead_reason = "the engine has shut down"
        by_instance: dict[str, list[str]] = {}
        error = EngineDeadError(self._dead_reason)
        for request_id, stream in list(self._streams.items()):
            if stream.instance_id is not None:
                by_instance.setdefault(stream.instance_id, []).append(request_id)
            self._end_stream(request_id, error, tell_instance=False)
        aborts = [
            self._call(self._instances[i].actor.abort.remote(ids), self.rpc_timeout_s)
            for i, ids in by_instance.items()
            if self._instances[i].alive
        ]
        for result in await asyncio.gather(*aborts, return_exceptions=True):
            if isinstance(result, Exception):
                logger.warning("aborting requests at shutdown failed: %s", summarize_error(result))

    @property
    def max_request_tokens(self) -> int:
        return self._max_request_tokens

    # ---- what the cluster looks like -------------------------------------------------------
    @property
    def instance_ids(self) -> list[str]:
        """The instances alive (dispatch chooses among them)."""
        return [i for i, inst in self._instances.items() if inst.alive]

    def role_of(self, instance_id: str) -> InstanceRole:
        return self._instances[instance_id].info.role

    @property
    def disaggregated(self) -> bool:
        """Whether prefill and decode run on separate instances (DistServe)."""
        return any(inst.info.role == "decode" for inst in self._instances.values())

    def instance_of(self, request_id: str) -> str | None:
        """The instance holding a request in flight (None before its submit returned)."""
        stream = self._streams.get(request_id)
        return None if stream is None else stream.instance_id

    def add_instance(self, instance_id: str, actor: Any, info: InstanceInfo) -> None:
        """Put a new, ready instance to work: dispatch may choose it from its first load report."""
        if instance_id in self._instances:
            raise ValueError(f"instance id {instance_id!r} is already in use")
        inst = self._instances[instance_id] = _Instance(instance_id, actor, info)
        if self._tasks and not self._closed:
            loop = asyncio.get_running_loop()
            self._tasks.append(loop.create_task(self._pump(inst), name=f"sutra-pump-{instance_id}"))

    def is_dead(self, instance_id: str) -> bool:
        """Whether this client saw the instance die (an instance it never held is not dead)."""
        inst = self._instances.get(instance_id)
        return inst is not None and not inst.alive

    def detach(self, instance_id: str) -> None:
        """Stop using an instance that holds no request, leaving its actor alive (it goes on to serve
        another model: sutra/cluster/models.py). Drain it first (begin_drain_instance)."""
        inst = self._instances[instance_id]
        if self.requests_on(instance_id):
            raise RuntimeError(f"engine instance {instance_id} still holds requests")
        inst.dead_reason = "detached"  # its pump stops at its next poll's answer and routes nothing more
        del self._instances[instance_id]
        self.affinity.forget(instance_id)
        self.dispatch.forget(instance_id)

    def relocate(self, request_id: str) -> bool:
        """Move a running request off its instance by recompute (ServerlessLLM's token-level
        migration): it is aborted there, and once its instance confirms, with every token it sent
        handed out, it resumes on the instance dispatch picks from its prompt and those tokens
        (failover.py). False when it cannot (n > 1, or not held by an instance)."""
        stream = self._streams.get(request_id)
        if stream is None or stream.progress is None or stream.instance_id is None or stream.relocating:
            return False
        stream.relocating = True
        self._send_abort(stream.instance_id, request_id)
        return True

    def busy_seconds(self, instance_id: str, unknown_s: float) -> float:
        """About how long until the requests an instance holds are done, from their completion
        estimates (`unknown_s` for one without an estimate); 0 for an idle instance."""
        now = time.monotonic()
        busy = 0.0
        for stream in self._streams.values():
            if stream.instance_id == instance_id:
                remaining = (
                    unknown_s if stream.estimate is None else stream.arrival_time + stream.estimate[0] - now
                )
                busy = max(busy, remaining)
        return busy

    def actor_of(self, instance_id: str) -> Any:
        return self._instances[instance_id].actor

    def requests_on(self, instance_id: str) -> list[str]:
        """The requests in flight that instance holds."""
        return [rid for rid, s in self._streams.items() if s.instance_id == instance_id]

    async def call(self, ref: Awaitable[T], timeout_s: float) -> T:
        """An instance call's result, within timeout_s; a dead instance is dropped from the cluster."""
        return await self._call(ref, timeout_s)

    async def begin_drain_instance(self, instance_id: str) -> None:
        """The instance takes no new requests (its load says draining, so dispatch skips it)."""
        inst = self._instances[instance_id]
        await self._call(inst.actor.begin_drain.remote(), self.rpc_timeout_s)
        await self._refresh_loads()

    async def retire(self, instance_id: str) -> None:
        """Stop using an instance and kill its actor (after a drain); its requests left resume
        elsewhere (or end; see failover.py)."""
        inst = self._instances[instance_id]
        self._instance_died(inst, "retired by the operator", kill=True)

    # ---- requests --------------------------------------------------------------------------
    async def submit_many(self, requests: list[PromptRequest], spec: RequestSpec = RequestSpec()) -> None:
        """Send the requests, all together and all or none, to the instance the dispatch policy
        picks. Raises what the instance raised (InvalidRequestError, EngineOverloadedError), or
        EngineOverloadedError when no instance could take them."""
        self._check_accepting()
        seen: set[str] = set()
        for request_id, _, _ in requests:
            if request_id in self._streams or request_id in seen:
                raise ValueError(f"request id {request_id!r} is already in use")
            seen.add(request_id)
        if not self.loads():
            await self._refresh_loads()  # before the first refresh: dispatch needs loads
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        # Registered before the call: the instance's first updates may arrive before its answer.
        streams = {
            request_id: _Stream(
                queue=asyncio.Queue(),
                spec=spec,
                prompt_token_ids=prompt,
                arrival_time=now,
                admitted=loop.create_future(),
                progress=self.failover.track(params),
            )
            for request_id, prompt, params in requests
        }
        self._streams.update(streams)
        try:
            instance_id = await self._place(requests, spec)
        except BaseException:
            for request_id, stream in streams.items():
                if self._streams.get(request_id) is stream:
                    del self._streams[request_id]
            raise
        inst = self._instances[instance_id]
        for request_id, stream in streams.items():
            if self._streams.get(request_id) is stream:
                stream.instance_id = instance_id
                if not inst.alive:  # it died before its answer was read: nothing else sees to these
                    error = instance_died_error(instance_id, inst.dead_reason)
                    self.failover.rescue(request_id, stream, error)
            else:  # ended (abort_all, or it already finished) while the call was under way
                self._send_abort(instance_id, request_id)

    async def _place(self, requests: list[PromptRequest], spec: RequestSpec) -> str:
        """Submit to one instance after another, as dispatch picks them, until one takes the
        requests; returns its id."""
        # The first prompt's prefix steers the batch: all its prompts go to one instance.
        hashes = prefix_hashes(requests[0][1], self.block_size, spec.cache_salt)
        request = self._dispatch_request(requests, self.affinity.lookup(hashes))
        tried: set[str] = set()
        refusal: EngineOverloadedError | None = None
        while True:
            # New work goes to instances that run prompts; decode instances get it by hand-off, unless
            # none of those is alive: then they run it whole (serving degrades to colocated).
            prompt_runners = any(self.role_of(i) != "decode" for i in self.instance_ids)
            loads = {
                i: load
                for i, load in self.loads().items()
                if i not in tried and (self.role_of(i) != "decode" or not prompt_runners)
            }
            try:
                instance_id = self.dispatch.choose(loads, request)
            except NoInstanceError as e:
                if self._dead_reason is not None:
                    raise EngineDeadError(self._dead_reason) from None
                raise refusal or EngineOverloadedError(str(e)) from None
            tried.add(instance_id)
            inst = self._instances[instance_id]
            try:
                error = await self._call(inst.actor.submit_many.remote(requests, spec), self.rpc_timeout_s)
            except ActorDiedError as e:
                self._instance_died(inst, summarize_error(e))
                continue
            except (RayActorError, TimeoutError) as e:
                # It may have queued them: make sure it lets them go, and let the client retry.
                for request_id, _, _ in requests:
                    self._send_abort(instance_id, request_id)
                raise EngineOverloadedError(
                    f"engine instance {instance_id} did not answer ({summarize_error(e)}); retry later"
                ) from None
            if error is None:
                self.affinity.record(hashes, instance_id)
                return instance_id
            if isinstance(error, EngineOverloadedError):  # full or draining: another may have room
                refusal = error
                continue
            if isinstance(error, EngineDeadError):  # its engine loop has stopped
                self._instance_died(inst, str(error))
                continue
            raise error

    def _dispatch_request(
        self, requests: list[PromptRequest], preferred: str | None = None
    ) -> DispatchRequest:
        bs = self.block_size
        return DispatchRequest(
            preferred=preferred,
            num_requests=sum(params.n for _, _, params in requests),
            num_prompt_tokens=sum(len(prompt) for _, prompt, _ in requests),
            # n samples of one prompt share its blocks (prefix caching); +1: the first output token
            demand_blocks=sum(-(-(len(prompt) + 1) // bs) for _, prompt, _ in requests),
        )

    def abort(self, request_id: str) -> None:
        self._end_stream(request_id, None)  # None: aborted; wakes a reader, which then ends
