"""Live migration in the cluster simulator (sutra/sim/cluster.py): each rebalancing round's moves, one at
a time, through the real core records (OutgoingMigration on the source's scheduler, a MigrationInbox
reserving the destination's blocks, Scheduler.adopt on commit, then the source's release), each costing
the request its downtime (MigrationModel). A hand-off (sutra/sim/disagg.py) commits as a move does
(_land). A mixin of ClusterSimulator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sutra.cluster.rebalance import MigrationPair
from sutra.core.migration import MigrationAborted, OutgoingMigration
from sutra.core.request import Request
from sutra.sim.simulator import SimEngine

if TYPE_CHECKING:
    from sutra.sim.cluster import ClusterSimulator


@dataclass(frozen=True)
class MigrationModel:
    """How long a live-migrated request makes no progress: fixed_s + per_token_s * its tokens.

    The defaults are the line through benchmarks/RESULTS.md "Downtime vs context length" (live,
    in-process, 2-core CPU): 74 ms at 1,024 tokens and 136 ms at 7,168. That figure is the request's
    longest stream gap, so it includes one CPU decode step (60-121 ms there) and the destination's
    step is priced again here: a conservative default. The gap less that step was 5-15 ms; through Ray
    on busy cores the cluster benchmark saw a median of 263 ms."""

    fixed_s: float = 0.0637
    per_token_s: float = 1.01e-5

    def downtime_s(self, num_tokens: int) -> float:
        return self.fixed_s + self.per_token_s * num_tokens


DEFAULT_MIGRATION = MigrationModel()


@dataclass(frozen=True)
class MigrationRecord:
    request_id: str
    source: str
    destination: str
    paused_at: float  # simulated seconds
    resumed_at: float  # it joins the destination's next step from here
    num_tokens: int  # context at the pause


@dataclass
class Move:
    migration: OutgoingMigration
    request: Request  # paused on the source
    record: MigrationRecord


def migration_candidate(engine: SimEngine) -> str | None:
    """The request a source offers to move: MigrationSource.candidate's rule (sutra/engine/
    migration.py, not imported: it needs torch), the running request past its prefill with the
    fewest blocks. A paused request is not running, and simulated requests all have n == 1."""
    decoding = [r for r in engine.scheduler.running if not r.is_prefilling]
    if not decoding:
        return None
    return min(decoding, key=lambda r: len(engine.kv.block_ids(r.request_id))).request_id


class SimMigrations:
    def _next_move(self: ClusterSimulator) -> None:
        """Start the round's next move that can start; the rest wait until it lands."""
        while self._round and self._move is None:
            self._start_move(self._round.popleft())

    def _start_move(self: ClusterSimulator, pair: MigrationPair) -> None:
        source = self.engines[pair.source]
        request_id = migration_candidate(source)
        if request_id is None:
            return
        migration_id = f"{request_id}->{pair.destination}-{len(self._result.migrations)}"
        begun = self._begin(pair.source, pair.destination, request_id, migration_id)
        if begun is None:
            self._result.migrations_refused += 1
            return
        outgoing, request = begun
        # The source's state is as of its step in flight: it pauses when that step ends.
        paused_at = max(self.clock, source.now)
        resumed_at = paused_at + self.migration.downtime_s(request.num_tokens)
        record = MigrationRecord(
            request_id, pair.source, pair.destination, paused_at, resumed_at, request.num_tokens
        )
        self._move = Move(outgoing, request, record)  # the destination adopts it when it lands
        self._at(resumed_at, self._finish_move)

    def _begin(
        self: ClusterSimulator, source_id: str, destination_id: str, request_id: str, migration_id: str
    ) -> tuple[OutgoingMigration, Request] | None:
        """A move through the real records up to the pause: the source's OutgoingMigration (pre-copy
        stages, then pause), the destination's inbox reserving blocks for each. None, with nothing
        changed on either side, when a record calls it off."""
        source, inbox = self.engines[source_id], self.inboxes[destination_id]
        outgoing: OutgoingMigration | None = None
        try:
            outgoing = OutgoingMigration.begin(source.scheduler, request_id, migration_id)
            inbox.open(migration_id, request_id, self.engines[destination_id].scheduler)
            while (stage := outgoing.next_stage(source.scheduler)) is not None:
                inbox.reserve(migration_id, len(stage))
            request, rest = outgoing.pause(source.scheduler)
            inbox.reserve(migration_id, len(rest))
        except MigrationAborted:
            inbox.abort(migration_id)
            if outgoing is not None:
                outgoing.abort(source.scheduler)
            return None
        return outgoing, request

    def _land(
        self: ClusterSimulator, outgoing: OutgoingMigration, old: Request, source_id: str, destination_id: str
    ) -> None:
        """Commit a move at the current clock: the destination adopts the request (num_computed_tokens
        kept), the source releases it, and its trace continues on the destination."""
        source, destination = self.engines[source_id], self.engines[destination_id]
        # What MovedRequest.to_request rebuilds on a real destination.
        request = Request(
            old.request_id,
            old.prompt_token_ids,
            old.sampling_params,
            eos_token_ids=old.eos_token_ids,
            arrival_time=old.arrival_time,
            spec=old.spec,
        )
        request.token_ids.extend(old.output_token_ids)
        request.num_computed_tokens = old.num_computed_tokens
        request.num_cached_tokens = old.num_cached_tokens
        request.num_preemptions = old.num_preemptions
        if not destination.has_work():  # an idle instance wakes for it
            destination.now = max(destination.now, self.clock)
        self.inboxes[destination_id].commit(outgoing.migration_id, destination.scheduler, request)
        outgoing.commit(source.scheduler)  # released there: blocks and runner state
        destination.traces[old.request_id] = source.traces.pop(old.request_id)

    def _finish_move(self: ClusterSimulator) -> None:
        move = self._move
        assert move is not None
        self._move = None
        record = move.record
        self._land(move.migration, move.request, record.source, record.destination)
        self._result.migrations.append(record)
        self._result.instances[record.source].migrated_out += 1
        self._result.instances[record.destination].migrated_in += 1
        self._next_move()
