"""How progress gets from the instances to the readers of a ClusterClient: one long-poll pump per
instance, and routing by request id, whichever instance sent an update, so a request that moves
between instances (live migration, hand-off) keeps its stream. Updates for a request another instance
holds wait until it moves to their sender. A mixin of ClusterClient (sutra/cluster/client.py).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import replace
from typing import TYPE_CHECKING

from ray.exceptions import ActorDiedError, RayActorError

from sutra.cluster.failover import instance_died_error
from sutra.cluster.messages import Update
from sutra.cluster.rpc import summarize_error
from sutra.engine.client import EngineDeadError

if TYPE_CHECKING:
    from sutra.cluster.client import ClusterClient, _Instance

logger = logging.getLogger("sutra.cluster.client")

# How long an instance holds a poll open when it has nothing to send.
POLL_WAIT_S = 1.0
# Polls in a row without an answer before an instance counts as dead.
MAX_MISSED_POLLS = 3


class UpdateRouting:
    async def _pump(self: ClusterClient, inst: _Instance) -> None:
        """Long-poll one instance until it dies or the client shuts down."""
        ack, missed = 0, 0
        while inst.alive and not self._closed:
            try:
                updates = await self._call(
                    inst.actor.poll.remote(ack, self.poll_wait_s), self.poll_wait_s + self.rpc_timeout_s
                )
            except ActorDiedError as e:
                self._instance_died(inst, summarize_error(e))
                return
            except (RayActorError, TimeoutError) as e:  # unreachable for now, or slow: ask again
                missed += 1
                logger.warning("engine instance %s missed a poll: %s", inst.instance_id, summarize_error(e))
                if missed >= MAX_MISSED_POLLS:
                    self._instance_died(inst, f"it did not answer {missed} polls in a row", kill=True)
                    return
                continue
            if not inst.alive:  # declared dead meanwhile: its requests resume from what was routed
                return
            missed = 0
            fresh = [u for u in updates if u.seq > ack]  # a repeat of a lost reply: skip what we have
            if not fresh:
                continue
            ack = fresh[-1].seq
            try:
                self._route(fresh, inst.instance_id)
            except Exception:  # a bug here must not stop the pump (every stream would hang)
                logger.exception("routing updates of engine instance %s failed", inst.instance_id)

    def _route(self: ClusterClient, updates: list[Update], sender: str) -> None:
        """Hand each update to its request's stream, in order; updates for a request another
        instance holds wait until it moves to their sender; listeners see the deltas first."""
        ready: list[Update] = []
        orphans: list[tuple[str, str]] = []  # (request id, destination): moved to a dead instance
        pending = deque((sender, u) for u in updates)
        while pending:
            source, u = pending.popleft()
            stream = self._streams.get(u.request_id)
            if u.kind == "moved":
                self.migrator.moved_seen(u.request_id, source)
            if stream is None:
                if u.kind == "moved" and u.destination is not None:  # aborted while it moved
                    self._send_abort(u.destination, u.request_id)
                continue
            if stream.instance_id is not None and stream.instance_id != source:
                stream.early.append((source, u))
                continue
            ready.append(u)
            if u.kind == "moved" and u.destination is not None:
                stream.instance_id = u.destination
                waiting, stream.early = stream.early, []
                pending.extendleft(reversed(waiting))  # next in line: they came after the move
                if not self._instances[u.destination].alive:
                    orphans.append((u.request_id, u.destination))
        self._deliver(ready)
        for request_id, destination in orphans:  # it died with the request still on the source
            stream = self._streams.get(request_id)
            if stream is not None and stream.instance_id == destination:
                reason = self._instances[destination].dead_reason
                self.failover.rescue(request_id, stream, instance_died_error(destination, reason))

    def _deliver(self: ClusterClient, updates: list[Update]) -> None:
        outgoing: list[Update] = []
        finished: set[str] = set()  # a resumed request can end here, on a stop string, mid-batch
        for u in updates:
            stream = self._streams.get(u.request_id)
            if stream is None or u.request_id in finished:
                continue  # aborted (or ended) here already
            if u.kind == "delta":
                assert u.delta is not None
                delta = self.failover.handed_out(stream, u.delta)
                if delta.finished:
                    finished.add(u.request_id)
                if delta is not u.delta:
                    u = replace(u, delta=delta)
            outgoing.append(u)
        updates = outgoing
        deltas = [u.delta for u in updates if u.kind == "delta"]
        if deltas:
            for listener in self.listeners:
                try:
                    listener.on_step(self, deltas)
                except Exception:
                    logger.exception("engine listener %s failed on a step; skipped", type(listener).__name__)
        for u in updates:
            stream = self._streams.get(u.request_id)
            if stream is None:
                continue  # aborted (or ended) here already
            if u.kind == "admitted":
                stream.estimate = u.estimate
                if not stream.admitted.done():
                    stream.admitted.set_result(None if u.estimate is None else u.estimate[0])
            elif u.kind == "delta":
                assert u.delta is not None
                if u.delta.finished:  # kept for a reader yet to come: here one may finish first
                    del self._streams[u.request_id]
                    self._close(u.request_id, stream, u.delta)
                else:
                    stream.queue.put_nowait(u.delta)
            elif u.kind == "error":
                self._end_stream(u.request_id, u.error or EngineDeadError("unknown"), tell_instance=False)
            elif u.kind == "moved":
                pass  # the new holder was noted in _route
            elif u.kind == "parked":
                if stream.instance_id is not None:
                    self.handoffs.parked(u.request_id, stream.instance_id, u.num_tokens)
            elif stream.relocating:  # its instance let it go as asked: it goes on elsewhere
                stream.relocating = False
                self.failover.resume(u.request_id, stream, "relocated by recompute")
            else:
                error = EngineDeadError("the engine instance ended the request before it finished")
                self._end_stream(u.request_id, error, tell_instance=False)
