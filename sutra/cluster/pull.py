"""The decode instance's side of a hand-off (disaggregated serving): it pulls a request parked on a
prefill instance, actor to actor, so the KV crosses Ray's object store once and never passes through
the front end.

A hand-off is a migration with nothing to pre-copy (the request is parked: no step touches it), cut
to the calls that must be made:

    prefill.out_hand_off   its state and whole KV, read beside the prefill instance's steps
    decode.in_adopt        layout check, reserve, write and adopt, at one step boundary here
    prefill.out_hand_over  its stream there ends with "moved" at once; its blocks are released
                           between the prefill instance's next steps, in the background

so a prefill instance busy with long prompt chunks never holds a hand-off up. If the decode instance
refuses (short of room) or fails, `out_hand_off_abort` leaves the request parked for another try; if
its client left during the hand-off, the decode instance drops it.

DistServe's pull admission: a decode instance takes a request only while its free blocks stay above a
watermark after reserving the request's (MigrationInbox.min_free_blocks), so a burst of finished
prefills never floods it; the prefill instance holds the KV until then.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from sutra.cluster.messages import PullReply
from sutra.cluster.rpc import call
from sutra.core.migration import MigrationAborted
from sutra.engine.migration import MovedRequest
from sutra.engine.migration_endpoint import MigrationEndpoint, MigrationResult

PULL_WATERMARK = 0.05  # of the decode instance's pool, kept free for its own requests' growth
MAX_OPEN_PULLS = 4  # hand-offs one decode instance takes at once
PULL_STEP_TIMEOUT_S = 30.0  # one call to the prefill instance (a copy of its KV included)


class RemoteSource:
    """A prefill instance actor's hand-off operations, each with a timeout."""

    def __init__(self, actor: Any, instance_id: str, timeout_s: float = PULL_STEP_TIMEOUT_S) -> None:
        self.actor = actor
        self.instance_id = instance_id
        self.timeout_s = timeout_s

    async def call(self, op: str, *args: Any) -> Any:
        try:
            reply = await call(self.actor.migration.remote(op, *args), self.timeout_s)
        except TimeoutError:
            raise TimeoutError(
                f"prefill instance {self.instance_id} did not answer {op} in {self.timeout_s:g} s"
            ) from None
        if reply.error is not None:
            raise reply.error
        return reply.value


async def pull(
    source: RemoteSource,
    endpoint: MigrationEndpoint,
    request_id: str,
    migration_id: str,
    destination: str,
    on_adopted: Callable[[], None],
    before_adopt: Callable[[MovedRequest], Awaitable[None]] | None = None,
) -> PullReply:
    """Take `request_id` from the prefill instance `source` into this instance (`endpoint`);
    `before_adopt` runs once its state has arrived, `on_adopted` once it is held here. Never raises:
    how it went is in the reply."""
    result = MigrationResult(migrated=False)
    moved = None
    committed = False
    try:
        layout, moved, blocks = await source.call("out_hand_off", request_id, migration_id)
        started = time.perf_counter()
        try:
            if before_adopt is not None:
                await before_adopt(moved)
            await endpoint.in_adopt(migration_id, moved, blocks, layout)
        except BaseException:
            await source.call("out_hand_off_abort", migration_id)  # it stays parked there
            raise
        committed = True
        on_adopted()
        result.bytes_copied = blocks.data.nbytes
        result.downtime_s = time.perf_counter() - started
        await source.call("out_hand_over", migration_id, destination)
        result.migrated = True
    except MigrationAborted as e:  # refused for room, or the request ended there meanwhile
        result.reason = str(e)
        if committed:  # its client left during the hand-off: drop it here too
            await endpoint.abort_request(request_id)
    except Exception as e:  # the prefill instance died or timed out
        result.reason, result.failed = f"{type(e).__name__}: {e}", True
    return PullReply(result, moved, committed)
