"""The decode instance's side of a hand-off (disaggregated serving): it pulls a request parked on a
prefill instance, actor to actor, so the KV crosses Ray's object store once and never passes through
the front end. The protocol is live migration's (sutra/engine/migration_endpoint.migrate) with no
pre-copy stage: the prefill side's ops are calls to its actor, the decode side's run here.

DistServe's pull admission: a decode instance takes a request only while its free blocks stay above a
watermark after reserving the request's (MigrationInbox.min_free_blocks), so a burst of finished
prefills never floods it; the prefill instance holds the KV until then.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from sutra.engine.kv_transfer import KVBlocks, KVLayout
from sutra.engine.migration import MovedRequest
from sutra.engine.migration_endpoint import MigrationEndpoint

PULL_WATERMARK = 0.05  # of the decode instance's pool, kept free for its own requests' growth
MAX_OPEN_PULLS = 4  # hand-offs one decode instance takes at once
PULL_STEP_TIMEOUT_S = 30.0  # one call to the prefill instance (a copy of its KV included)


class RemoteSource:
    """A prefill instance actor as the source side of a migration (the names migrate() calls)."""

    def __init__(self, actor: Any, instance_id: str, timeout_s: float = PULL_STEP_TIMEOUT_S) -> None:
        self.actor = actor
        self.instance_id = instance_id
        self.timeout_s = timeout_s
        self.moved: MovedRequest | None = None  # the request as it was paused there

    async def _step(self, op: str, *args: Any) -> Any:
        future = asyncio.ensure_future(self.actor.migration.remote(op, *args))
        try:
            done, _ = await asyncio.wait([future], timeout=self.timeout_s)
        finally:
            if not future.done():
                future.cancel()
        if not done:
            raise TimeoutError(
                f"prefill instance {self.instance_id} did not answer {op} in {self.timeout_s:g} s"
            )
        reply = future.result()
        if reply.error is not None:
            raise reply.error
        return reply.value

    async def out_begin(self, request_id: str, migration_id: str, limits: dict[str, int]) -> KVLayout:
        return await self._step("out_begin", request_id, migration_id, limits)

    async def out_stage(self, migration_id: str) -> KVBlocks | None:
        return await self._step("out_stage", migration_id)

    async def out_pause(self, migration_id: str) -> tuple[MovedRequest, KVBlocks]:
        moved, blocks = await self._step("out_pause", migration_id)
        self.moved = moved
        return moved, blocks

    async def out_commit(self, migration_id: str, destination: str) -> None:
        await self._step("out_commit", migration_id, destination)

    async def out_abort(self, migration_id: str) -> None:
        await self._step("out_abort", migration_id)


class LocalTarget:
    """This instance's MigrationEndpoint as the destination side; `on_commit` runs once it holds
    the request (its progress then leaves by this instance's outbox)."""

    def __init__(self, endpoint: MigrationEndpoint, on_commit: Callable[[], None]) -> None:
        self.endpoint = endpoint
        self.on_commit = on_commit
        self.committed = False

    async def in_open(self, migration_id: str, request_id: str, layout: KVLayout) -> None:
        await self.endpoint.in_open(migration_id, request_id, layout)

    async def in_stage(self, migration_id: str, blocks: KVBlocks) -> None:
        await self.endpoint.in_stage(migration_id, blocks)

    async def in_commit(self, migration_id: str, moved: MovedRequest, blocks: KVBlocks) -> None:
        await self.endpoint.in_commit(migration_id, moved, blocks)
        self.committed = True
        self.on_commit()

    async def in_abort(self, migration_id: str) -> None:
        await self.endpoint.in_abort(migration_id)

    async def abort_request(self, request_id: str) -> None:
        await self.endpoint.abort_request(request_id)
