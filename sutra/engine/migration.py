"""The engine's side of live migration: the core state machines (sutra/core/migration.py) joined to
the runner's KV export/import and to the engine's per-request output state.

A source engine's `MigrationSource` and a destination engine's `MigrationTarget` are called in
this order, between steps of each engine (in one process, or as Ray actor methods):

    src.begin(rid, mid) -> dst.open(mid, rid, src layout)
    while (blocks := src.stage(mid)) is not None: dst.stage(mid, blocks)   # the request keeps running
    moved, blocks = src.pause(mid) -> dst.commit(mid, moved, blocks) -> src.commit(mid)

and either side's `abort(mid)` calls it off at any point with no block leaked. Only single-sample
requests (n == 1) move. What crosses is plain data: KVBlocks (uint8 numpy) and a MovedRequest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sutra.core.migration import MigrationAborted, MigrationInbox, OutgoingMigration
from sutra.core.request import Request, RequestSpec
from sutra.engine.kv_transfer import KVBlocks, KVLayout
from sutra.model.logprobs import TokenLogprobs
from sutra.outputs import RequestMetrics
from sutra.sampling_params import SamplingParams

if TYPE_CHECKING:
    from sutra.engine.engine import LLMEngine


@dataclass
class MovedRequest:
    """Everything a destination needs to continue a request where the source paused it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    spec: RequestSpec
    arrival_time: float
    num_computed_tokens: int
    num_cached_tokens: int
    num_preemptions: int
    text: str  # the output text so far
    logprobs: list[TokenLogprobs] | None
    metrics: RequestMetrics
    detokenizer_state: tuple[list[int], int, int]
    # What the source's stream had handed its reader (characters, tokens), so the destination's
    # stream continues from there: nothing lost, nothing repeated.
    sent_text: int = 0
    sent_tokens: int = 0
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # RequestOutput.prompt_logprobs

    def to_request(self, eos_token_ids: frozenset[int]) -> Request:
        request = Request(
            self.request_id,
            self.prompt_token_ids,
            self.sampling_params,
            eos_token_ids=eos_token_ids,
            arrival_time=self.arrival_time,
            spec=self.spec,
        )
        request.token_ids.extend(self.output_token_ids)
        request.num_computed_tokens = self.num_computed_tokens
        request.num_cached_tokens = self.num_cached_tokens
        request.num_preemptions = self.num_preemptions
        return request


class MigrationSource:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.outgoing: dict[str, OutgoingMigration] = {}

    def begin(self, request_id: str, migration_id: str, **limits: int) -> KVLayout:
        """Start moving a running request; returns the KV layout the destination must match."""
        if migration_id in self.outgoing:
            raise MigrationAborted(f"migration {migration_id} is already under way")
        if any(m.request_id == request_id for m in self.outgoing.values()):
            raise MigrationAborted(f"request {request_id!r} is already moving")
        if self.engine.num_samples(request_id) != 1:
            raise MigrationAborted(f"request {request_id!r} is not a running single-sample request here")
        self.outgoing[migration_id] = OutgoingMigration.begin(
            self.engine.scheduler, request_id, migration_id, **limits
        )
        return self.engine.runner.kv_layout()

    def candidate(self) -> str | None:
        """The running single-sample request past its prefill with the fewest blocks, if any."""
        engine = self.engine
        moving = {m.request_id for m in self.outgoing.values()}
        decoding = [
            r
            for r in engine.scheduler.running
            if not r.is_prefilling and r.request_id not in moving and engine.num_samples(r.request_id) == 1
        ]
        if not decoding:
            return None
        return min(decoding, key=lambda r: len(engine.kv.block_ids(r.request_id))).request_id

    def next_stage(self, migration_id: str) -> list[int] | None:
        """Block ids of the next pre-copy stage, pinned until `unpin` (so export() may read them
        while steps run: full blocks never change), or None when it is time to pause."""
        mig = self._get(migration_id)
        try:
            block_ids = mig.next_stage(self.engine.scheduler)
        except MigrationAborted:
            self.abort(migration_id)
            raise
        if block_ids is not None:
            self.engine.kv.pin(block_ids)
        return block_ids

    def export(self, block_ids: list[int]) -> KVBlocks:
        return self.engine.runner.export_blocks(block_ids)

    def unpin(self, block_ids: list[int]) -> None:
        self.engine.kv.unpin(block_ids)

    def stage(self, migration_id: str) -> KVBlocks | None:
        """next_stage, export and unpin in one call (all between steps)."""
        block_ids = self.next_stage(migration_id)
        if block_ids is None:
            return None
        try:
            return self.export(block_ids)
        finally:
            self.unpin(block_ids)

    def pause(self, migration_id: str) -> tuple[MovedRequest, KVBlocks]:
        """Stop the request; return its state and the rest of its KV (the partial block included)."""
        mig = self._get(migration_id)
        try:
            request, block_ids = mig.pause(self.engine.scheduler)
        except MigrationAborted:
            self.abort(migration_id)
            raise
        return self.engine.moved_request(request), self.engine.runner.export_blocks(block_ids)

    def commit(self, migration_id: str) -> None:
        """The destination holds the request: drop it here, with no output (it finishes there)."""
        mig = self.outgoing.pop(migration_id, None)
        if mig is None:
            raise MigrationAborted(f"migration {migration_id} is not under way here")
        self.engine.forget_moved(mig.commit(self.engine.scheduler).request_id)

    def abort(self, migration_id: str) -> None:
        mig = self.outgoing.pop(migration_id, None)
        if mig is not None:
            mig.abort(self.engine.scheduler)

    def _get(self, migration_id: str) -> OutgoingMigration:
        mig = self.outgoing.get(migration_id)
        if mig is None:
            raise MigrationAborted(f"migration {migration_id} is not under way here")
        return mig


class MigrationTarget:
    def __init__(self, engine: LLMEngine, min_free_blocks: int = 0, lease_s: float = 10.0) -> None:
        self.engine = engine
        self.inbox = MigrationInbox(engine.kv, min_free_blocks=min_free_blocks, lease_s=lease_s)

    def open(self, migration_id: str, request_id: str, layout: KVLayout) -> None:
        """Accept a migration if the KV layouts match and the request id is free here."""
        self.engine.runner.kv_layout().check_matches(layout)
        if self.engine.num_samples(request_id) != 0:
            raise MigrationAborted(f"request id {request_id!r} is already in use here")
        self.inbox.open(migration_id, request_id, self.engine.scheduler)

    def reserve(self, migration_id: str, num_blocks: int) -> list[int]:
        """Blocks for a stage's KV; refused (and the migration aborted) if blocks are short."""
        return self.inbox.reserve(migration_id, num_blocks)

    def write(self, migration_id: str, block_ids: list[int], blocks: KVBlocks) -> None:
        """Write a stage's KV into its reserved blocks. No step reads a reserved block, so this may
        run while steps do; if it raises, the caller aborts the migration (between steps)."""
        self.engine.runner.import_blocks(block_ids, blocks)

    def stage(self, migration_id: str, blocks: KVBlocks) -> None:
        """reserve and write in one call (between steps)."""
        block_ids = self.reserve(migration_id, blocks.n_blocks)
        try:
            self.write(migration_id, block_ids, blocks)
        except Exception:
            self.abort(migration_id)
            raise

    def commit(self, migration_id: str, moved: MovedRequest, blocks: KVBlocks) -> None:
        """Write the last stage and adopt the request: it runs here from its next step."""
        self.stage(migration_id, blocks)

        def admit(request: Request) -> None:
            self.inbox.commit(migration_id, self.engine.scheduler, request)

        try:
            self.engine.adopt_moved(moved, admit)
        except Exception:
            self.abort(migration_id)
            raise

    def abort(self, migration_id: str) -> None:
        self.inbox.abort(migration_id)

    def expire(self) -> list[str]:
        return self.inbox.expire()
