"""Live migration between two serving engines: each side's operations on its AsyncEngine, and the
driver that runs the protocol over any two endpoints (two AsyncEngines in one process, or two Ray
instance actors whose methods have these names).

Every change of engine state runs between steps (AsyncEngine.between_steps); the pre-copy stages'
copies run beside the steps (on pinned full blocks at the source, which never change, and reserved
blocks at the destination, which no step reads), so the request keeps decoding on the source while
most of its KV is copied, and the downtime is one short last stage: pause,
copy at most `last_stage_blocks` blocks plus the request's state, adopt on the destination, release
on the source. The source's stream ends with RequestMoved(destination), and the destination's stream
starts where it stopped, so a reader that follows the move sees every token once, in order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from sutra.core.migration import MigrationAborted
from sutra.engine.async_engine import AsyncEngine
from sutra.engine.kv_transfer import KVBlocks, KVLayout
from sutra.engine.migration import MovedRequest

logger = logging.getLogger(__name__)


class MigrationPeer(Protocol):
    """What the driver calls on either side (an endpoint here, or a proxy to a Ray actor)."""

    async def out_begin(self, request_id: str, migration_id: str, limits: dict[str, int]) -> KVLayout: ...
    async def out_stage(self, migration_id: str) -> KVBlocks | None: ...
    async def out_pause(self, migration_id: str) -> tuple[MovedRequest, KVBlocks]: ...
    async def out_commit(self, migration_id: str, destination: str) -> None: ...
    async def out_abort(self, migration_id: str) -> None: ...
    async def in_open(self, migration_id: str, request_id: str, layout: KVLayout) -> None: ...
    async def in_stage(self, migration_id: str, blocks: KVBlocks) -> None: ...
    async def in_commit(self, migration_id: str, moved: MovedRequest, blocks: KVBlocks) -> None: ...
    async def in_abort(self, migration_id: str) -> None: ...
    async def abort_request(self, request_id: str) -> None: ...


class MigrationEndpoint:
    """One engine's side of live migrations (source and destination)."""

    def __init__(self, aengine: AsyncEngine) -> None:
        self.aengine = aengine
        self.engine = aengine.engine
        self._releases: set[asyncio.Task[None]] = set()

    # ---- as the source ---------------------------------------------------------------------
    async def out_begin(self, request_id: str, migration_id: str, limits: dict[str, int]) -> KVLayout:
        source = self.engine.migration_source
        return await self.aengine.between_steps(lambda: source.begin(request_id, migration_id, **limits))

    async def out_stage(self, migration_id: str) -> KVBlocks | None:
        source = self.engine.migration_source
        block_ids = await self.aengine.between_steps(source.next_stage, migration_id)
        if block_ids is None:
            return None
        try:  # the copy runs beside the steps: the request keeps decoding meanwhile
            return await asyncio.to_thread(source.export, block_ids)
        finally:
            await self.aengine.between_steps(source.unpin, block_ids)

    async def out_pause(self, migration_id: str) -> tuple[MovedRequest, KVBlocks]:
        moved, blocks = await self.aengine.between_steps(self.engine.migration_source.pause, migration_id)
        # Read after the await: the outputs of the step before the pause are published by then.
        try:
            sent_text, sent_tokens = self.aengine.stream_position(moved.request_id)
        except KeyError:  # its reader left while it paused; the pending abort ends it here
            await self.out_abort(migration_id)
            raise MigrationAborted(f"request {moved.request_id!r} was aborted by its client") from None
        return dataclasses.replace(moved, sent_text=sent_text, sent_tokens=sent_tokens), blocks

    async def out_commit(self, migration_id: str, destination: str) -> None:
        request_id = self.engine.migration_source.outgoing[migration_id].request_id
        await self.aengine.between_steps(self.engine.migration_source.commit, migration_id)
        if not self.aengine.hand_off(request_id, destination):
            raise MigrationAborted(f"request {request_id!r} was aborted by its client during the move")

    async def out_abort(self, migration_id: str) -> None:
        await self.aengine.between_steps(self.engine.migration_source.abort, migration_id)
        self.aengine.wake()  # a resumed request needs steps again

    # ---- hand-offs of parked requests (disaggregated serving; the driver is cluster/pull.py) ----
    async def out_hand_off(
        self, request_id: str, migration_id: str
    ) -> tuple[KVLayout, MovedRequest, KVBlocks]:
        """A parked request's state and whole KV, claimed for a decode instance. Read beside the
        steps: no step touches a parked request, so a prefill instance busy with long prompt chunks
        does not hold the hand-off up."""
        source = self.engine.migration_source

        def take() -> tuple[KVLayout, MovedRequest, KVBlocks]:
            layout = source.begin(request_id, migration_id)
            if not source.outgoing[migration_id].parked:
                source.abort(migration_id)
                raise MigrationAborted(f"request {request_id!r} is not parked here")
            moved, blocks = source.pause(migration_id)
            return layout, moved, blocks

        layout, moved, blocks = await self.aengine.beside_steps(take)
        try:
            sent_text, sent_tokens = self.aengine.stream_position(request_id)
        except KeyError:  # its reader left; the pending abort ends it here
            await self.aengine.beside_steps(source.abort, migration_id)
            raise MigrationAborted(f"request {request_id!r} was aborted by its client") from None
        return layout, dataclasses.replace(moved, sent_text=sent_text, sent_tokens=sent_tokens), blocks

    async def out_hand_over(self, migration_id: str, destination: str) -> None:
        """The decode instance holds the request: its stream here ends with RequestMoved at once,
        and its blocks are released between the next steps (in the background: the decode side
        need not wait for a long prompt chunk to finish here)."""
        source = self.engine.migration_source
        record = source.outgoing.get(migration_id)
        if record is None:
            raise MigrationAborted(f"migration {migration_id} is not under way here")
        if not self.aengine.hand_off(record.request_id, destination):
            await self.aengine.beside_steps(source.abort, migration_id)
            raise MigrationAborted(
                f"request {record.request_id!r} was aborted by its client during the hand-off"
            )
        task = asyncio.get_running_loop().create_task(self._release(migration_id))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(self, migration_id: str) -> None:
        try:
            await self.aengine.between_steps(self.engine.migration_source.commit, migration_id)
        except MigrationAborted:  # aborted meanwhile: the abort freed it
            pass
        except Exception:
            logger.exception("releasing handed-off migration %s failed", migration_id)

    async def out_hand_off_abort(self, migration_id: str) -> None:
        """Call a hand-off off: the request stays parked here for another try."""
        await self.aengine.beside_steps(self.engine.migration_source.abort, migration_id)

    async def in_adopt(
        self, migration_id: str, moved: MovedRequest, blocks: KVBlocks, layout: KVLayout
    ) -> None:
        """Take a handed-off request in one step boundary: check the layout, reserve its blocks
        (refused with MigrationAborted, nothing kept, when that would leave fewer free than the
        inbox keeps), write its KV, adopt it."""
        target = self.engine.migration_target

        def adopt() -> None:
            target.open(migration_id, moved.request_id, layout)
            target.commit(migration_id, moved, blocks)  # reserves, writes, adopts; aborts on failure

        await self._adopt(moved, adopt)

    # ---- as the destination ----------------------------------------------------------------
    async def in_open(self, migration_id: str, request_id: str, layout: KVLayout) -> None:
        target = self.engine.migration_target
        await self.aengine.between_steps(target.open, migration_id, request_id, layout)

    async def in_stage(self, migration_id: str, blocks: KVBlocks) -> None:
        target = self.engine.migration_target
        block_ids = await self.aengine.between_steps(target.reserve, migration_id, blocks.n_blocks)
        await asyncio.to_thread(target.write, migration_id, block_ids, blocks)

    async def in_commit(self, migration_id: str, moved: MovedRequest, blocks: KVBlocks) -> None:
        target = self.engine.migration_target
        await self._adopt(moved, lambda: target.commit(migration_id, moved, blocks))

    async def _adopt(self, moved: MovedRequest, adopt: Callable[[], None]) -> None:
        """Open the arriving request's stream where the source's stopped, then run `adopt` between
        steps; if it raises, the stream goes again."""
        self.aengine.take_over(
            moved.request_id,
            moved.prompt_token_ids,
            moved.sampling_params,
            moved.spec,
            moved.sent_text,
            moved.sent_tokens,
        )
        try:
            await self.aengine.between_steps(adopt)
        except BaseException:
            self.aengine.drop_stream(moved.request_id)
            raise
        self.aengine.wake()

    async def in_abort(self, migration_id: str) -> None:
        await self.aengine.between_steps(self.engine.migration_target.abort, migration_id)

    async def abort_request(self, request_id: str) -> None:
        self.aengine.abort(request_id)


@dataclass
class MigrationResult:
    migrated: bool
    stages: int = 0  # pre-copy stages, the last one not counted
    bytes_copied: int = 0
    downtime_s: float = 0.0  # from the pause to the destination holding the request
    reason: str = ""  # why it was called off
    failed: bool = False  # called off by a fault (an instance died or timed out), not a refusal

    @property
    def outcome(self) -> str:
        return "migrated" if self.migrated else "failed" if self.failed else "aborted"


async def migrate(
    src: MigrationPeer | Any,
    dst: MigrationPeer | Any,
    request_id: str,
    migration_id: str,
    destination: str,
    **limits: int,
) -> MigrationResult:
    """Move a running request from src to dst; on any refusal or failure the request runs on where
    it was and neither side keeps a block for it."""
    result = MigrationResult(migrated=False)
    committed = False
    try:
        layout = await src.out_begin(request_id, migration_id, limits)
        await dst.in_open(migration_id, request_id, layout)
        while (blocks := await src.out_stage(migration_id)) is not None:
            await dst.in_stage(migration_id, blocks)
            result.stages += 1
            result.bytes_copied += blocks.data.nbytes
        paused_at = time.perf_counter()
        moved, blocks = await src.out_pause(migration_id)
        await dst.in_commit(migration_id, moved, blocks)
        committed = True
        result.bytes_copied += blocks.data.nbytes
        result.downtime_s = time.perf_counter() - paused_at
        await src.out_commit(migration_id, destination)
        result.migrated = True
    except MigrationAborted as e:
        result.reason = str(e)
        if committed:  # the request ended on the source (its client left) after dst took it
            await dst.abort_request(request_id)
    except BaseException as e:
        result.reason = f"{type(e).__name__}: {e}"
        if not committed:
            await _call_off(src, dst, migration_id)
        raise
    if not result.migrated and not committed:
        await _call_off(src, dst, migration_id)
    return result


async def _call_off(src: Any, dst: Any, migration_id: str) -> None:
    try:
        await dst.in_abort(migration_id)
    finally:  # a destination that died must not leave the request paused on the source
        await src.out_abort(migration_id)
