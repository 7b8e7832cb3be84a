"""Hand-offs of disaggregated serving (DistServe), as the front end coordinates them.

A prefill instance runs a request's prompt, streams its first token and parks it, holding its KV
("parked" update). The coordinator queues parked requests oldest first and gives the head to the
decode instance with the most free blocks that can take it: its free blocks, less those promised to
pulls under way, stay above the watermark after the request's, and it has fewer than `max_pulls`
pulls under way. That instance pulls the request from the prefill instance, actor to actor
(sutra/cluster/pull.py). Strict FIFO: when the head fits nowhere, nothing behind it jumps the queue,
so a long prompt is not starved by short ones. The queue is tried again at every load read (~100 ms),
on every park, and when a pull ends. When no decode instance is left alive, the prefill instances
decode what they park (serving degrades to colocated rather than stopping).

A pull that is refused (the decode instance turned out short of room) or fails leaves the request
parked; it goes back to the head of the queue and is tried again at the next load read. The prefill
instance holds it meanwhile, so nothing is lost and both sides' memory stays bounded: a prefill
instance full of parked requests admits no new prompts until some leave. A request aborted by its
client, or whose prefill instance died (failover resubmits it; it parks again on its new instance),
is dropped from the queue when its turn comes.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sutra.cluster.messages import PullReply
from sutra.cluster.migrator import Move
from sutra.cluster.pull import PULL_STEP_TIMEOUT_S, PULL_WATERMARK
from sutra.core.migration import watermark_blocks
from sutra.engine.migration_endpoint import MigrationResult

if TYPE_CHECKING:
    from sutra.cluster.client import ClusterClient

logger = logging.getLogger(__name__)

MAX_PULLS = 2  # pulls under way into one decode instance
# A whole pull: its four calls to the prefill instance plus this instance's own work between steps.
PULL_TIMEOUT_S = 4 * PULL_STEP_TIMEOUT_S


@dataclass(frozen=True)
class HandOffRecord:
    """One pull, for metrics: how long the request waited parked before it, and how it went."""

    request_id: str
    source: str
    destination: str
    wait_s: float  # from the "parked" update to the start of this pull
    transfer_s: float  # the pull itself: the KV copy, the request's state, adoption
    result: MigrationResult


@dataclass
class _Parked:
    source: str
    parked_at: float  # time.monotonic() when the front end learned it parked
    blocks: int  # what the decode instance must reserve: its KV, and the next token's slot


class HandOffs:
    """The parked requests and the pulls under way; see the module docstring."""

    def __init__(
        self, client: ClusterClient, max_pulls: int = MAX_PULLS, watermark: float = PULL_WATERMARK
    ) -> None:
        self.client = client
        self.max_pulls = max_pulls
        self.watermark = watermark
        self.queue: OrderedDict[str, _Parked] = OrderedDict()
        self.pulls: dict[str, int] = {}  # decode instance -> pulls under way
        self.promised: dict[str, int] = {}  # decode instance -> blocks those pulls will take (or took)
        # Of those, blocks of pulls that landed, by the number of load reads started before they
        # did: loads read by a read started earlier do not show them, so they stay promised.
        self.landed: dict[str, list[tuple[int, int]]] = {}
        self.listeners: list[Callable[[HandOffRecord], None]] = []
        self.num_handed_off = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def parked(self, request_id: str, source: str, num_tokens: int) -> None:
        """A prefill instance parked the request (it holds `num_tokens` tokens)."""
        blocks = -(-(num_tokens + 1) // self.client.block_size)
        self.queue[request_id] = _Parked(source, time.monotonic(), blocks)
        self.assign()

    def loads_refreshed(self, read_index: int) -> None:
        """The loads read by read number `read_index` are in: they show every pull that landed
        before that read started."""
        for destination, entries in self.landed.items():
            shown = sum(blocks for index, blocks in entries if index <= read_index)
            if shown:
                self.promised[destination] -= shown
                entries[:] = [(index, blocks) for index, blocks in entries if index > read_index]
        if self.queue:
            self.assign()

    def discard(self, request_id: str) -> None:
        """The request ended (its client left, or it failed): it no longer waits for a pull."""
        self.queue.pop(request_id, None)

    def assign(self) -> None:
        """Start pulls for the head of the queue while a decode instance has room for it."""
        client = self.client
        alive = [i for i in client.instance_ids if client.role_of(i) == "decode"]
        if not alive and self.queue:
            self._decode_where_parked()
            return
        loads = client.loads()
        decoders = [i for i in alive if i in loads]
        while self.queue:
            request_id, parked = next(iter(self.queue.items()))
            if client.instance_of(request_id) != parked.source:  # aborted, or resumed elsewhere
                del self.queue[request_id]
                continue
            room = {}
            for i in decoders:
                load = loads[i]
                free = load.free_blocks - self.promised.get(i, 0) - parked.blocks
                if not load.draining and self.pulls.get(i, 0) < self.max_pulls:
                    if free >= watermark_blocks(load.total_blocks, self.watermark):
                        room[i] = free
            if not room:
                return  # the head waits; FIFO
            destination = max(room, key=lambda i: room[i])
            del self.queue[request_id]
            self.pulls[destination] = self.pulls.get(destination, 0) + 1
            self.promised[destination] = self.promised.get(destination, 0) + parked.blocks
            task = asyncio.get_running_loop().create_task(self._pull(request_id, parked, destination))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _decode_where_parked(self) -> None:
        """No decode instance is alive: the prefill instances decode what they parked (and, as
        requests keep parking there, whatever comes next), so serving degrades to colocated."""
        by_source: dict[str, list[str]] = {}
        for request_id, parked in self.queue.items():
            if self.client.instance_of(request_id) == parked.source:
                by_source.setdefault(parked.source, []).append(request_id)
        self.queue.clear()
        logger.warning(
            "no decode instance is alive: %d parked requests decode where they prefilled",
            sum(map(len, by_source.values())),
        )
        for source, request_ids in by_source.items():
            task = asyncio.get_running_loop().create_task(self._unpark(source, request_ids))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _unpark(self, source: str, request_ids: list[str]) -> None:
        try:
            await self.client.call(
                self.client.actor_of(source).unpark.remote(request_ids), PULL_STEP_TIMEOUT_S
            )
        except Exception as e:  # that instance died too: failover resubmits its requests
            logger.warning("prefill instance %s could not decode its parked requests: %s", source, e)

    async def _pull(self, request_id: str, parked: _Parked, destination: str) -> None:
        client = self.client
        started = time.monotonic()
        move = client.migrator.moving[request_id] = Move(parked.source, destination)
        migration_id = f"{request_id}=>{destination}-{uuid.uuid4().hex[:8]}"
        try:
            actor = client.actor_of(destination)
            ref = actor.pull.remote(client.actor_of(parked.source), parked.source, request_id, migration_id)
            reply: PullReply = await client.call(ref, PULL_TIMEOUT_S)
            result = reply.result
            move.moved, move.committed = reply.moved, reply.committed
        except Exception as e:  # the decode instance died or timed out
            logger.warning("pull of %s by %s failed: %s", request_id, destination, e)
            result = MigrationResult(migrated=False, reason=f"{type(e).__name__}: {e}", failed=True)
        finally:
            self.pulls[destination] -= 1
            if move.committed:  # the decode instance holds it: promised until its loads show it
                self.landed.setdefault(destination, []).append((client.load_reads, parked.blocks))
            else:
                self.promised[destination] -= parked.blocks
            move.ended.set()
            if not move.committed:
                client.migrator.moved_seen(request_id, parked.source)
        if move.committed and not result.migrated:  # the prefill instance will send no "moved"
            client.failover.follow(request_id, move)
        if result.migrated:
            self.num_handed_off += 1
        elif not move.committed and client.instance_of(request_id) == parked.source:
            # Still parked there: first in line again, tried at the next load read.
            self.queue[request_id] = parked
            self.queue.move_to_end(request_id, last=False)
            logger.info("hand-off of %s to %s called off: %s", request_id, destination, result.reason)
        record = HandOffRecord(
            request_id,
            parked.source,
            destination,
            started - parked.parked_at,
            time.monotonic() - started,
            result,
        )
        for listener in self.listeners:
            try:
                listener(record)
            except Exception:
                logger.exception("hand-off listener failed")
        if result.migrated:
            self.assign()

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
