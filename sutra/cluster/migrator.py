"""The cluster's migrations: moving a running request between instance actors (on demand, for load
balance under the llumnix policy, and to drain an instance), and what they report.

The protocol is sutra/engine/migration_endpoint.migrate, driven from the front end over two
`ActorPeer`s, so the KV crosses Ray's object store (the source returns it, the destination takes it
as an argument) and each step has a timeout. An instance takes part in one migration at a time, as
source or destination; any failure leaves the request running where it was, with no block held.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sutra.cluster.messages import MigrationReply
from sutra.cluster.rebalance import Rebalancer
from sutra.core.migration import MigrationAborted
from sutra.engine.migration import MovedRequest
from sutra.engine.migration_endpoint import MigrationResult, migrate

if TYPE_CHECKING:
    from sutra.cluster.client import ClusterClient

logger = logging.getLogger(__name__)

STEP_TIMEOUT_S = 30.0  # one migration step (a copy of up to ~1 GiB on a busy CPU included)
DRAIN_POLL_S = 0.2


@dataclass
class Move:
    """A migration under way, as far as the front end knows: what failover needs should the source
    die before its "moved" update arrives (sutra/cluster/failover.py)."""

    source: str
    destination: str
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    moved: MovedRequest | None = None  # the request as the source paused it
    committed: bool = False  # the destination has taken the request over


class ActorPeer:
    """One instance actor as a MigrationPeer (the names the driver calls)."""

    def __init__(
        self,
        client: ClusterClient,
        instance_id: str,
        timeout_s: float = STEP_TIMEOUT_S,
        move: Move | None = None,
    ) -> None:
        self.client = client
        self.instance_id = instance_id
        self.actor = client.actor_of(instance_id)
        self.timeout_s = timeout_s
        self.move = move

    async def _step(self, op: str, *args: Any) -> Any:
        reply: MigrationReply = await self.client.call(self.actor.migration.remote(op, *args), self.timeout_s)
        if reply.error is not None:
            raise reply.error
        if self.move is not None:
            if op == "out_pause":
                self.move.moved = reply.value[0]
            elif op == "in_commit":
                self.move.committed = True
        return reply.value

    def __getattr__(self, op: str) -> Callable[..., Any]:
        if not op.startswith(("out_", "in_")):
            raise AttributeError(op)
        return lambda *args: self._step(op, *args)

    async def abort_request(self, request_id: str) -> None:
        await self.client.call(self.actor.abort.remote([request_id]), self.timeout_s)


class Migrator:
    def __init__(self, client: ClusterClient, rebalancer: Rebalancer | None = None) -> None:
        self.client = client
        self.rebalancer = rebalancer or Rebalancer()
        self.busy: set[str] = set()  # instances in a migration now
        # By request id: moves under way, and committed ones whose "moved" update is yet to be routed.
        self.moving: dict[str, Move] = {}
        # Told of every migration that was tried (metrics): (result).
        self.listeners: list[Callable[[MigrationResult], None]] = []
        self.num_migrated = 0

    async def migrate(self, request_id: str, destination: str, **limits: int) -> MigrationResult:
        """Move a running request to `destination`; raises MigrationAborted when it cannot start
        (unknown request or instance, one of them busy), returns how it went otherwise."""
        source = self.client.instance_of(request_id)
        if source is None:
            raise MigrationAborted(f"request {request_id!r} is not in flight")
        if destination not in self.client.instance_ids:
            raise MigrationAborted(f"no engine instance {destination!r} is alive")
        if source == destination:
            raise MigrationAborted(f"request {request_id!r} already runs on {destination}")
        if {source, destination} & self.busy:
            raise MigrationAborted(f"{source} or {destination} is in another migration")
        if request_id in self.moving:  # its last move's "moved" update is still on its way
            raise MigrationAborted(f"request {request_id!r} is still moving")
        self.busy |= {source, destination}
        move = self.moving[request_id] = Move(source, destination)
        try:
            src = ActorPeer(self.client, source, move=move)
            dst = ActorPeer(self.client, destination, move=move)
            mid = f"{request_id}->{destination}-{uuid.uuid4().hex[:8]}"
            try:
                result = await migrate(src, dst, request_id, mid, destination, **limits)
            except Exception as e:  # an instance died or timed out: the call-off ran; report it
                logger.warning("migration of %s from %s to %s failed: %s", request_id, source, destination, e)
                result = MigrationResult(migrated=False, reason=f"{type(e).__name__}: {e}", failed=True)
        finally:
            self.busy -= {source, destination}
            move.ended.set()
            if not move.committed:
                self.moved_seen(request_id, source)
        if move.committed and not result.migrated:  # the source will send no "moved" update
            self.client.failover.follow(request_id, move)
        if result.migrated:
            self.num_migrated += 1
            logger.info(
                "moved %s from %s to %s: %d stages, %.1f MiB, paused %.1f ms",
                request_id,
                source,
                destination,
                result.stages,
                result.bytes_copied / 2**20,
                result.downtime_s * 1e3,
            )
        for listener in self.listeners:
            try:
                listener(result)
            except Exception:
                logger.exception("migration listener failed")
        return result

    def moved_seen(self, request_id: str, source: str) -> None:
        """The front end has routed the source's "moved" update (or the move is off): forget it. A
        committed move is kept until then, for failover should the source die first."""
        move = self.moving.get(request_id)
        if move is not None and move.source == source:
            del self.moving[request_id]

    async def candidate(self, instance_id: str) -> str | None:
        """The request the instance would move out first (fewest blocks, decoding, n == 1)."""
        actor = self.client.actor_of(instance_id)
        return await self.client.call(actor.migration_candidate.remote(), STEP_TIMEOUT_S)

    async def rebalance(self) -> int:
        """One round of Llumnix's trigger: one request per pair the loads call for. Returns how
        many moved."""
        moved = 0
        loads = self.client.loads()
        if self.client.disaggregated:  # balance the decode instances; prefills leave by hand-off
            loads = {i: load for i, load in loads.items() if self.client.role_of(i) == "decode"}
        for pair in self.rebalancer.pairs(loads):
            if {pair.source, pair.destination} & self.busy:
                continue
            request_id = await self.candidate(pair.source)
            if request_id is None or self.client.instance_of(request_id) != pair.source:
                continue
            try:
                result = await self.migrate(request_id, pair.destination)
            except MigrationAborted:
                continue
            moved += result.migrated
        return moved

    async def drain(self, instance_id: str, timeout_s: float) -> dict[str, int]:
        """Move every request off an instance (it takes no new ones meanwhile), as they become
        movable; requests that cannot move (n > 1, or still prefilling at the deadline) finish
        there. Returns what moved and what was left when it returned."""
        await self.client.begin_drain_instance(instance_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        moved = failed = 0
        while loop.time() < deadline:
            left = self.client.requests_on(instance_id)
            if not left:
                break
            role = self.client.role_of(instance_id)
            others = [
                i for i in self.client.instance_ids if i != instance_id and self.client.role_of(i) == role
            ]
            request_id = await self.candidate(instance_id) if others else None
            if request_id is None:
                await asyncio.sleep(DRAIN_POLL_S)  # prefilling, or only multi-sample ones left
                continue
            loads = self.client.loads()
            destination = max(others, key=lambda i: loads[i].freeness if i in loads else float("-inf"))
            try:
                result = await self.migrate(request_id, destination)
            except MigrationAborted:
                await asyncio.sleep(DRAIN_POLL_S)
                continue
            moved += result.migrated
            failed += not result.migrated
            if not result.migrated:  # refused (the destination is short of room) or it ended: wait
                await asyncio.sleep(DRAIN_POLL_S)
        return {"moved": moved, "failed": failed, "left": len(self.client.requests_on(instance_id))}
