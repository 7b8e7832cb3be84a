"""Live migration of a running request between instances (Llumnix), as two plain state machines.

The source keeps running the request while its full KV blocks are copied in pre-copy stages; once
few enough blocks are left (or the stages run out) it pauses the request, sends the rest (the partial
last block included) with the request's state, and on the destination's commit releases it. The
destination reserves blocks as stages arrive and, on commit, adopts the request into its running set
with `num_computed_tokens` already there, so nothing is recomputed. Pre-copy is safe because a KV
position is written once: a full block never changes, and a preemption (which frees blocks) aborts.

Either side can abort at any stage, and no block leaks on either: the source resumes a paused
request, the destination gives back what it reserved (also when the source goes silent past the
lease). These records only decide and account; moving bytes is the runner's job (export/import), and
calling the two sides in order is the driver's (in one process, or over Ray).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sutra.core.kv_cache import KVCacheManager
from sutra.core.request import Request, RequestStatus
from sutra.core.scheduler import Scheduler
from sutra.errors import SutraError

LAST_STAGE_BLOCKS = 16  # Llumnix's default: pause once at most this many blocks are left to copy
MAX_PRECOPY_STAGES = 3
LEASE_S = 10.0  # the destination frees a silent migration's reservation after this long


def watermark_blocks(total_blocks: int, watermark: float) -> int:
    """The free blocks an incoming migration must leave: `watermark` of the pool, at least one."""
    return max(1, int(total_blocks * watermark))


class MigrationAborted(SutraError):
    """A migration was called off; the request stays (or is back) on its source, nothing leaked."""


class Phase(enum.Enum):
    PRECOPY = "precopy"
    PAUSED = "paused"
    COMMITTED = "committed"
    ABORTED = "aborted"


@dataclass
class OutgoingMigration:
    """The source's record of one request leaving."""

    migration_id: str
    request_id: str
    num_preemptions: int  # at the start: a preemption since drops the KV already sent
    last_stage_blocks: int = LAST_STAGE_BLOCKS
    max_stages: int = MAX_PRECOPY_STAGES
    sent_blocks: int = 0  # blocks of the request's table already copied
    stages: int = 0
    phase: Phase = Phase.PRECOPY
    # A hand-off (disaggregated serving): the request is parked after its prefill, so there is no
    # pre-copy (nothing runs meanwhile) and calling the move off leaves it parked for another try.
    parked: bool = False

    @classmethod
    def begin(
        cls, scheduler: Scheduler, request_id: str, migration_id: str, **limits: int
    ) -> OutgoingMigration:
        request = scheduler.requests.get(request_id)
        if request is not None and request_id in scheduler.parked:
            return cls(migration_id, request_id, request.num_preemptions, max_stages=0, parked=True)
        if request is None or request.status is not RequestStatus.RUNNING:
            raise MigrationAborted(f"request {request_id!r} is not running here")
        if request.is_prefilling:
            raise MigrationAborted(f"request {request_id!r} is still prefilling")
        return cls(migration_id, request_id, request.num_preemptions, **limits)

    def next_stage(self, scheduler: Scheduler) -> list[int] | None:
        """Block ids for the next pre-copy stage (full blocks not sent yet), or None when it is time
        to pause: few enough blocks are left, or the stages are used up."""
        request = self._check(scheduler)
        if self.parked:
            return None
        full = request.num_computed_tokens // scheduler.kv.block_size
        new = scheduler.kv.block_ids(self.request_id)[self.sent_blocks : full]
        if len(new) <= self.last_stage_blocks or self.stages >= self.max_stages:
            return None
        self.sent_blocks = full
        self.stages += 1
        return new

    def pause(self, scheduler: Scheduler) -> tuple[Request, list[int]]:
        """Stop the request and return it with the block ids still to copy (the partial one too)."""
        request = self._check(scheduler)
        if not self.parked:
            scheduler.pause(self.request_id)
        self.phase = Phase.PAUSED
        used = scheduler.kv.blocks_needed(request.num_computed_tokens)
        return request, scheduler.kv.block_ids(self.request_id)[self.sent_blocks : used]

    def commit(self, scheduler: Scheduler) -> Request:
        """The destination holds the request now: let it go here."""
        if self.phase is not Phase.PAUSED:
            raise MigrationAborted(f"migration {self.migration_id} cannot commit in phase {self.phase.value}")
        self.phase = Phase.COMMITTED
        try:
            return scheduler.release(self.request_id)
        except ValueError as e:  # aborted by its client while paused: it is gone already
            raise MigrationAborted(f"request {self.request_id!r} ended while paused ({e})") from e

    def abort(self, scheduler: Scheduler) -> None:
        """Call the move off: a paused request runs on here (a parked one stays parked). Safe at
        any phase, and twice."""
        if self.phase is Phase.PAUSED and not self.parked:
            request = scheduler.requests.get(self.request_id)
            if request is not None and request.status is RequestStatus.PAUSED:
                scheduler.resume(self.request_id)
        if self.phase is not Phase.COMMITTED:
            self.phase = Phase.ABORTED

    def _check(self, scheduler: Scheduler) -> Request:
        if self.phase is not Phase.PRECOPY:
            raise MigrationAborted(f"migration {self.migration_id} is {self.phase.value}")
        request = scheduler.requests.get(self.request_id)
        if self.parked:
            if request is None or self.request_id not in scheduler.parked:
                raise MigrationAborted(f"request {self.request_id!r} is no longer parked here")
            return request
        if request is None or request.status is not RequestStatus.RUNNING:
            raise MigrationAborted(f"request {self.request_id!r} finished or stopped running")
        if request.num_preemptions != self.num_preemptions:
            raise MigrationAborted(f"request {self.request_id!r} was preempted: its KV is gone")
        return request


@dataclass
class IncomingMigration:
    """The destination's record of one request arriving: the blocks reserved for it, in order."""

    migration_id: str
    request_id: str
    deadline: float
    block_ids: list[int] = field(default_factory=list)
    phase: Phase = Phase.PRECOPY


class MigrationInbox:
    """The destination's open migrations. Reservations are refused when they would leave fewer than
    `min_free_blocks` free (the instance's own requests come first), and freed when a migration is
    aborted, or its source is silent for `lease_s`."""

    def __init__(
        self,
        kv: KVCacheManager,
        min_free_blocks: int = 0,
        lease_s: float = LEASE_S,
        clock: Callable[[], float] = time.monotonic,
        max_open: int = 4,
    ) -> None:
        self.kv = kv
        self.min_free_blocks = min_free_blocks
        self.lease_s = lease_s
        self.clock = clock
        self.max_open = max_open
        self.open_migrations: dict[str, IncomingMigration] = {}

    def open(
        self, migration_id: str, request_id: str, scheduler: Scheduler | None = None
    ) -> IncomingMigration:
        """Open a migration; with `scheduler`, refused when the requests running there and those
        arriving would leave no seat (max_num_seqs) for this one."""
        self.expire()
        if migration_id in self.open_migrations:
            raise MigrationAborted(f"migration {migration_id} is already open")
        if len(self.open_migrations) >= self.max_open:
            raise MigrationAborted(f"this instance already takes {self.max_open} migrations")
        if scheduler is not None and not scheduler.rules.has_seat(
            len(scheduler.running) + len(self.open_migrations)
        ):
            raise MigrationAborted(
                f"migration {migration_id} refused: no free seat ({scheduler.rules.max_num_seqs} requests at most)"
            )
        record = IncomingMigration(migration_id, request_id, self.clock() + self.lease_s)
        self.open_migrations[migration_id] = record
        return record

    def reserve(self, migration_id: str, num_blocks: int) -> list[int]:
        """Blocks for the next stage's KV; refuses (and aborts the migration) when short."""
        record = self._get(migration_id)
        if self.kv.num_free_blocks - num_blocks < self.min_free_blocks:
            self.abort(migration_id)
            raise MigrationAborted(
                f"migration {migration_id} refused: {num_blocks} blocks asked, "
                f"{self.kv.num_free_blocks} free, {self.min_free_blocks} kept for local requests"
            )
        block_ids = self.kv.reserve(num_blocks)
        assert block_ids is not None  # checked above
        record.block_ids.extend(block_ids)
        record.deadline = self.clock() + self.lease_s
        return block_ids

    def commit(self, migration_id: str, scheduler: Scheduler, request: Request) -> None:
        """The request joins the running set on the blocks its stages filled."""
        record = self._get(migration_id)
        scheduler.adopt(request, record.block_ids)
        record.phase = Phase.COMMITTED
        del self.open_migrations[migration_id]

    def abort(self, migration_id: str) -> None:
        """Give back what the migration reserved. Safe for an unknown or already ended migration."""
        record = self.open_migrations.pop(migration_id, None)
        if record is not None:
            self.kv.release_reserved(record.block_ids)
            record.phase = Phase.ABORTED

    def expire(self) -> list[str]:
        """Abort migrations whose source has been silent past the lease; returns their ids."""
        now = self.clock()
        expired = [mid for mid, r in self.open_migrations.items() if r.deadline <= now]
        for migration_id in expired:
            self.abort(migration_id)
        return expired

    def _get(self, migration_id: str) -> IncomingMigration:
        record = self.open_migrations.get(migration_id)
        if record is None:
            raise MigrationAborted(f"migration {migration_id} is not open here (aborted or expired)")
        return record
