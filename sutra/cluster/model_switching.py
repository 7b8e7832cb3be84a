"""Starting a model on an instance of a cluster of several models: choosing the instance (placement.py),
freeing it of its current model (its requests move away or finish), switching it, and putting it to
work in the new model's client. A mixin of ClusterModels (sutra/cluster/models.py).

Requests move by live migration (their KV copied: Llumnix) or, with migration "recompute", by
token-level migration (ServerlessLLM: aborted where they run and resumed on another instance from their
prompt and the tokens generated so far, recomputing the KV). Freeing an instance whose model runs
nowhere else, by moving, first starts that model on a free instance (ServerlessLLM's migration for
locality: the busy instance holds the wanted model's weights in memory; the model it runs starts from
wherever it loads quickest), then moves the requests there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ray.exceptions import RayActorError

from sutra.cluster.client import ClusterClient
from sutra.cluster.messages import InstanceInfo, ModelHoldings, ModelSwitch
from sutra.cluster.placement import (
    MOVE_S_PER_REQUEST,
    HostView,
    Startup,
    load_seconds,
    measured_bandwidth,
    place,
)
from sutra.cluster.rpc import call
from sutra.engine.client import EngineDeadError
from sutra.errors import SutraError
from sutra.model.tokenizer import Tokenizer
from sutra.server.served_model import ModelLoadFailedError, ModelState, ServedModel

if TYPE_CHECKING:
    from sutra.cluster.models import ClusterModels

logger = logging.getLogger("sutra.cluster.models")

# A switch evicts a model and loads another (converting it on its first load): minutes on a busy
# small machine, as an instance's start.
SWITCH_TIMEOUT_S = 600.0
RPC_TIMEOUT_S = 30.0
POLL_S = 0.05  # how often a vacating instance and a placement with no free instance look again
MOVE_TIMEOUT_S = 30.0  # for the live migrations that free an instance; what is left then finishes
UNKNOWN_BUSY_S = 2.0  # a request held without a completion estimate counts as this much work


@dataclass(eq=False)
class Host:
    instance_id: str
    actor: Any  # a Ray actor handle of InstanceActor
    info: InstanceInfo
    holdings: ModelHoldings
    busy: bool = False  # chosen for a model (being freed or switching): the placement leaves it out
    leaving: bool = False  # being freed: its model's new requests go elsewhere


class ModelSwitching:
    def _start_placing(self: ClusterModels, model: ServedModel) -> None:
        if model.name not in self._placing:
            task = asyncio.get_running_loop().create_task(self._place(model))
            self._placing[model.name] = task
            task.add_done_callback(lambda _: self._placing.pop(model.name, None))

    async def _place(self: ClusterModels, model: ServedModel) -> None:
        """Start the model on an instance while requests wait for it."""
        while self._waiters[model.name] and not self._draining:
            if self._serving(model):
                self._grant_waiters(model)
                return
            self._drop_dead_hosts()
            if not self._hosts:
                self._fail_waiters(model, EngineDeadError("every engine instance has died"))
                return
            startup = self._choose(model)
            if startup is None:  # every instance is being switched: look again shortly
                await asyncio.sleep(POLL_S)
                continue
            host = self._hosts[startup.instance_id]
            try:
                await self._vacate(host, startup.move)
                if not self._waiters[model.name]:
                    return  # its waiters gave up meanwhile: the instance stays free
                model.state = ModelState.LOADING
                self.observer.on_state(model.name, model.state)
                await self._switch(host, model)
            except RayActorError as e:  # the instance died: place the model elsewhere
                logger.error(
                    "instance %s died while starting the model %s: %s", host.instance_id, model.name, e
                )
                self._hosts.pop(host.instance_id, None)
            except ModelLoadFailedError as e:
                self._fail_waiters(model, e)
            except Exception as e:
                logger.exception("starting the model %s on %s failed", model.name, host.instance_id)
                error = ModelLoadFailedError(f"the model `{model.name}` could not be started: {e}")
                self._fail_waiters(model, error)
            finally:
                host.busy = False
                self._refresh_states()
            self._grant_waiters(model)

    def _choose(self: ClusterModels, model: ServedModel) -> Startup | None:
        """The instance to start the model on (marked busy), by estimated startup."""
        views = [self._view(h) for h in self._free_hosts() if h.holdings.ready != model.name]
        if self.placement == "lru" and views:  # the locality-blind baseline: idle first, then LRU
            views = [min(views, key=lambda v: (v.num_requests > 0, v.last_used, v.instance_id))]
        startup = place(views, model.name, self._nbytes(model.name))
        if startup is not None:
            self._hosts[startup.instance_id].busy = True
            logger.info(
                "model %s starts on %s: %s tier, ~%.2f s queue + %.2f s load%s",
                model.name,
                startup.instance_id,
                startup.tier,
                startup.queue_s,
                startup.load_s,
                " (its requests move away)" if startup.move else "",
            )
        return startup

    def _drop_dead_hosts(self: ClusterModels) -> None:
        """Forget the instances that died (their model's client saw it): nothing starts on them."""
        for host in list(self._hosts.values()):
            name = host.holdings.ready
            client = self.models[name].engine if name in self.models else None
            if not host.busy and isinstance(client, ClusterClient) and client.is_dead(host.instance_id):
                logger.error("instance %s is dead: models no longer start on it", host.instance_id)
                del self._hosts[host.instance_id]
                if not client.instance_ids:  # the model's last instance: it starts afresh elsewhere
                    self.models[name].engine = None
                    self._spawn(client.shutdown())

    def _free_hosts(self: ClusterModels) -> list[Host]:
        return [h for h in self._hosts.values() if not h.busy]

    def _view(self: ClusterModels, host: Host, relocate: bool = True) -> HostView:
        """What the placement knows of an instance: its model's requests there, how long they would
        take to finish, and to move (with `relocate`, also by starting the model elsewhere first)."""
        holdings = host.holdings
        current = holdings.ready
        model = self.models.get(current) if current else None
        client = model.engine if model is not None else None
        if model is None or not isinstance(client, ClusterClient):
            return HostView(host.instance_id, current, frozenset(holdings.cached), holdings.bandwidth, 0.0, 0)
        others = self._other_hosts(client, host)
        num_requests = len(client.requests_on(host.instance_id))
        busy_s = client.busy_seconds(host.instance_id, UNKNOWN_BUSY_S)
        move_s: float | None = None
        if others:
            move_s = num_requests * MOVE_S_PER_REQUEST
        else:  # its only instance: every request holding the model counts
            num_requests = max(num_requests, model.in_flight)
            if num_requests and not busy_s:
                busy_s = UNKNOWN_BUSY_S
            target = self._relocation(host) if relocate and num_requests else None
            if target is not None:
                move_s = target[1] + num_requests * MOVE_S_PER_REQUEST
        return HostView(
            host.instance_id,
            current,
            frozenset(holdings.cached),
            holdings.bandwidth,
            busy_s,
            num_requests,
            move_s,
            model.last_used,
        )

    def _other_hosts(self: ClusterModels, client: ClusterClient, host: Host) -> list[str]:
        """The other instances serving the model `host` serves (those not being freed)."""
        return [i for i in client.instance_ids if i != host.instance_id and not self._hosts[i].busy]

    def _relocation(self: ClusterModels, host: Host) -> tuple[Host, float] | None:
        """Where the model `host` alone serves would start quickest (an idle instance), and how long
        that takes; None if no instance is idle."""
        name = host.holdings.ready
        assert name is not None
        idle = [self._view(h, relocate=False) for h in self._free_hosts() if h is not host]
        idle = [v for v in idle if v.num_requests == 0]
        if not idle:
            return None
        fallback = measured_bandwidth(list(idle))
        nbytes = self._nbytes(name)
        seconds = {v.instance_id: load_seconds(v, name, nbytes, fallback) for v in idle}
        best = min(seconds, key=lambda i: (seconds[i], i))
        return self._hosts[best], seconds[best]

    def _nbytes(self: ClusterModels, name: str) -> int:
        for host in self._hosts.values():
            if name in host.holdings.model_bytes:
                return host.holdings.model_bytes[name]
        return self._weight_bytes.get(name, 0)

    async def _vacate(self: ClusterModels, host: Host, move: bool) -> None:
        """Free an instance of its model: no new requests of that model go there; its requests move
        to another instance of the model (with `move`) or finish; then it leaves the model's client.
        While it is the model's only instance, it waits for every request holding the model."""
        name = host.holdings.ready
        model = self.models.get(name) if name else None
        client = model.engine if model is not None else None
        if (
            model is None
            or not isinstance(client, ClusterClient)
            or host.instance_id not in client.instance_ids
        ):
            return
        host.leaving = True
        self._refresh_states()
        try:
            if move and not self._other_hosts(client, host):
                await self._relocate(host, model)
            while not self._other_hosts(client, host):  # the model's requests may still come here
                if model.in_flight == 0 and not client.requests_on(host.instance_id):
                    break
                await asyncio.sleep(POLL_S)
            else:  # another instance serves the model: it takes the new requests (and the moved ones)
                if move and self.migration == "live":
                    await client.migrator.drain(host.instance_id, MOVE_TIMEOUT_S)
                else:
                    await client.begin_drain_instance(host.instance_id)
                    if move:  # token-level: each resumes on another instance from its tokens
                        for request_id in client.requests_on(host.instance_id):
                            client.relocate(request_id)
                while client.requests_on(host.instance_id):
                    await asyncio.sleep(POLL_S)
            client.detach(host.instance_id)
            if not client.instance_ids:
                model.engine = None
                await client.shutdown()
        finally:
            host.leaving = False
        self.observer.on_evict(model.name)

    async def _relocate(self: ClusterModels, host: Host, model: ServedModel) -> None:
        """Start the model `host` alone serves on the idle instance where it loads quickest, so that
        host's requests can move there. Best effort: without it they finish where they are."""
        target = self._relocation(host)
        if target is None:
            return
        other = target[0]
        other.busy = True
        try:
            logger.info(
                "model %s also starts on %s, to free %s", model.name, other.instance_id, host.instance_id
            )
            await self._vacate(other, move=False)
            await self._switch(other, model)
        except Exception:
            logger.exception(
                "starting the model %s on %s to free %s failed",
                model.name,
                other.instance_id,
                host.instance_id,
            )
        finally:
            other.busy = False
            self._refresh_states()

    async def _switch(self: ClusterModels, host: Host, model: ServedModel) -> None:
        reply = await call(host.actor.switch_model.remote(model.name), SWITCH_TIMEOUT_S)
        if isinstance(reply, SutraError):
            raise ModelLoadFailedError(f"the model `{model.name}` could not be started: {reply}")
        assert isinstance(reply, ModelSwitch)
        host.info, host.holdings = reply.info, reply.holdings
        await self._attach(host, reply.info.model)  # the new model, or the old one loaded back
        if reply.error is not None:
            raise ModelLoadFailedError(str(reply.error))
        self.num_switches += 1
        model.loads += 1
        logger.info(
            "model %s ready (from %s) in %.2f s on %s",
            model.name,
            reply.tier,
            reply.seconds,
            host.instance_id,
        )
        self.observer.on_load(model.name, reply.tier, reply.seconds)

    async def _attach(self: ClusterModels, host: Host, name: str) -> None:
        """Put an instance serving `name` to work in that model's client (made if it has none)."""
        model = self.models[name]
        client = model.engine
        if isinstance(client, ClusterClient):
            client.add_instance(host.instance_id, host.actor, host.info)
        else:
            tokenizer = model.tokenizer or await call(host.actor.tokenizer.remote(), RPC_TIMEOUT_S)
            client = self._new_client(host, tokenizer)
            client.listeners.extend(self.listeners_for(model))
            client.start()
            if self._draining:
                client.begin_drain()
            model.engine, model.tokenizer = client, tokenizer
            model.max_model_len = host.info.max_model_len
        model.last_used = time.monotonic()

    def _new_client(self: ClusterModels, host: Host, tokenizer: Tokenizer) -> ClusterClient:
        return ClusterClient(
            {host.instance_id: host.actor},
            {host.instance_id: host.info},
            tokenizer,
            self._dispatch,
            **self._client_options,
        )
