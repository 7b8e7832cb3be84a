"""How requests and instances end for a ClusterClient (sutra/cluster/client.py): a request that ends
with an error (or by its client's abort) lets its instance know, the aborts batched per instance; an
instance that dies (or is retired) is dropped from dispatch and its requests resume elsewhere, or end
(sutra/cluster/failover.py). A mixin of ClusterClient.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import ray
from ray.exceptions import ActorDiedError

from sutra.cluster.failover import instance_died_error
from sutra.cluster.rpc import summarize_error

if TYPE_CHECKING:
    from sutra.cluster.client import ClusterClient, _Instance

logger = logging.getLogger("sutra.cluster.client")


class RequestEndings:
    def _instance_died(self: ClusterClient, inst: _Instance, reason: str, kill: bool = False) -> None:
        """Stop using an instance; its requests resume elsewhere, or end with EngineDeadError."""
        if not inst.alive:
            return
        self.affinity.forget(inst.instance_id)
        inst.dead_reason = reason
        logger.error("engine instance %s is dead: %s", inst.instance_id, reason)
        self.dispatch.forget(inst.instance_id)
        if kill:  # it may be alive but stuck: it must not go on computing for nobody
            try:
                ray.kill(inst.actor)
            except Exception as e:
                logger.warning("could not kill engine instance %s: %s", inst.instance_id, summarize_error(e))
        if self._dead_reason is None and not any(i.alive for i in self._instances.values()):
            self._dead_reason = f"every engine instance has died (the last, {inst.instance_id}: {reason})"
        error = instance_died_error(inst.instance_id, reason)
        for request_id, stream in list(self._streams.items()):
            if stream.instance_id == inst.instance_id:
                self.failover.rescue(request_id, stream, error)

    def _end_stream(
        self: ClusterClient, request_id: str, error: BaseException | None, tell_instance: bool = True
    ) -> None:
        """The request ends with `error` (its reader raises it; None: aborted, its reader just ends);
        with tell_instance, its instance lets it go too."""
        stream = self._streams.get(request_id)
        if stream is None:
            return
        self._notify_abort(request_id)  # while listeners can still look the request up
        del self._streams[request_id]
        self.handoffs.discard(request_id)
        self._close(request_id, stream, error)
        if tell_instance and stream.instance_id is not None:
            self._send_abort(stream.instance_id, request_id)

    def _notify_abort(self: ClusterClient, request_id: str) -> None:
        for listener in self.listeners:
            try:
                listener.on_abort(self, request_id)
            except Exception:
                logger.exception("engine listener %s failed on an abort; skipped", type(listener).__name__)

    def _send_abort(self: ClusterClient, instance_id: str, request_id: str) -> None:
        """Queue an abort for the instance; one task per instance sends them in batches."""
        inst = self._instances.get(instance_id)
        if inst is None or not inst.alive or self._closed:
            return
        inst.pending_aborts.append(request_id)
        if inst.abort_task is None or inst.abort_task.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop: nothing runs, so nothing to abort either
                return
            inst.abort_task = loop.create_task(self._flush_aborts(inst))

    async def _flush_aborts(self: ClusterClient, inst: _Instance) -> None:
        while inst.pending_aborts and inst.alive:
            request_ids, inst.pending_aborts = inst.pending_aborts, []
            try:
                await self._call(inst.actor.abort.remote(request_ids), self.rpc_timeout_s)
            except ActorDiedError as e:
                self._instance_died(inst, summarize_error(e))
            except Exception as e:
                logger.warning("aborting %d requests on %s failed: %s", len(request_ids), inst.instance_id, e)
