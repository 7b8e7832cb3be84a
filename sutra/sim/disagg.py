"""Disaggregated prefill/decode (DistServe) in the cluster simulator: prefill instances run prompts,
decode instances run the rest, and a request moves between them after its first token.

- Roles: prefill instances ("p0", "p1", ...) run the real scheduler with `hand_off_after_prefill`,
  so each request parks right after its first token (scheduler.parked), holding its prompt's KV;
  decode instances ("d0", ...) take them over. Each role has its own cost model (another thread or
  GPU count is another profile), pool size and, if wanted, scheduler options.
- Dispatch: arrivals go only to prefill instances, by the real DispatchPolicy on the loads read every
  `load_refresh_s` (sutra/sim/cluster.py's machinery); decode instances get work only by hand-off.
- The pull (the front end's coordinator, sutra/cluster/handoff.py, mirrored): parked requests queue
  oldest first; the head goes to the decode instance with the most free blocks that can take it (in
  the loads last read, less the blocks promised to its pulls under way, the request's blocks leave
  at least the watermark free, and it has fewer than `max_pulls` pulls under way). Strict FIFO: a
  head that fits nowhere waits, and nothing behind it jumps the queue. The queue is tried when a park
  is noticed (at the end of the step that parked it: the instance's "parked" update), at every load
  read, and when a pull lands.
- A hand-off is a live migration with no pre-copy through the real core records, in the real pull's
  order (sutra/cluster/pull.py): the prefill side's OutgoingMigration reads the parked request and its
  KV when the pull starts; `HandOffModel.transfer_s(tokens)` later the decode side's MigrationInbox
  reserves its blocks and Scheduler.adopt takes it (num_computed_tokens kept) at the decode
  instance's next step boundary, and the prefill side releases it. In between the request is on
  neither running set; several pulls may be under way at once. A landed pull's blocks stay promised
  until the next load read (whose loads show them). The inbox enforces the watermark on the live
  pool (min_free_blocks) and the seat limit (max_num_seqs), so a pull can be refused at adoption: the
  request stays parked, first in line, and is tried again at the next load read. The first token
  came from the prefill instance (TTFT ends there); the wait and the transfer delay the second. Each
  hand-off is recorded (wait from park to pull, transfer time).

Not modelled, beyond cluster.py's list: the coordinator's reaction time (a park is noticed, and a
pull starts, the instant its step ends) and the prefill instance's side of the copy (its steps go on
at full speed while the KV leaves).
"""

from __future__ import annotations

import dataclasses
import functools
from collections import OrderedDict
from dataclasses import dataclass

from sutra.cluster.dispatch import DEFAULT_DISPATCH
from sutra.cluster.rebalance import OUT_THRESHOLD
from sutra.config import SchedulerConfig
from sutra.core.migration import MigrationAborted, OutgoingMigration, watermark_blocks
from sutra.core.request import Request
from sutra.core.stats import InstanceLoad
from sutra.sim.cluster import (
    LOAD_REFRESH_S,
    REBALANCE_EVERY,
    ClusterSimResult,
    ClusterSimulator,
    HandOffRecord,
    MigrationModel,
)
from sutra.sim.executor import StepCost
from sutra.sim.simulator import SimEngine, SimRequest

# Mirrors of sutra/cluster/handoff.py and pull.py (which import Ray and torch; tests/sim/test_disagg.py
# checks they agree): pulls under way into one decode instance, the share of a decode instance's pool
# a pull never takes, and the hand-offs its inbox holds open at once.
MAX_PULLS = 2
PULL_WATERMARK = 0.05
MAX_OPEN_PULLS = 4


@dataclass(frozen=True)
class HandOffModel:
    """How long a hand-off takes from the pull's start to the request's adoption on the decode side:
    fixed_s + per_token_s * the tokens of KV it carries. The defaults are the fit to the measured
    pulls of benchmarks/disaggregation.py (the default model in fp32 between two 1-thread instances
    on a 2-core CPU, through Ray's object store: a median of 89 ms for 257-767-token prompts, 0.2 ms
    per token through the origin). They include the wait for the decode instance's step boundary,
    which the simulation also prices, so they are on the slow side; a GPU needs its own figures."""

    fixed_s: float = 0.0
    per_token_s: float = 2.0e-4

    def transfer_s(self, num_tokens: int) -> float:
        return self.fixed_s + self.per_token_s * num_tokens


DEFAULT_HAND_OFF = HandOffModel()


@dataclass(frozen=True)
class InstanceGroup:
    """`count` instances of one role, each with this cost model and a pool of `num_blocks` blocks;
    `scheduler_config` (None: the cluster's) sets that role's token budget, mode and policy."""

    count: int
    cost_model: StepCost
    num_blocks: int
    scheduler_config: SchedulerConfig | None = None


@dataclass
class _Parked:
    source: str
    parked_at: float
    blocks: int  # what the coordinator promises for it: its KV and the next token's slot


@dataclass
class _Pull:
    migration: OutgoingMigration
    request: Request  # as parked on the source
    block_ids: list[int]  # its KV there, to copy
    parked: _Parked
    destination: str
    started_at: float


class DisaggSimulator(ClusterSimulator):
    """Prefill and decode instances in one simulated time; see the module docstring. One run per
    simulator; the result is a ClusterSimResult with `roles` and `hand_offs` set."""

    wake_at_reads = True  # a prefill instance full of parked requests waits for a pull to free it

    def __init__(
        self,
        prefill: InstanceGroup,
        decode: InstanceGroup,
        scheduler_config: SchedulerConfig,
        block_size: int = 16,
        max_model_len: int = 8192,
        enable_prefix_caching: bool = True,
        dispatch: str = DEFAULT_DISPATCH,
        load_refresh_s: float = LOAD_REFRESH_S,
        hand_off: HandOffModel = DEFAULT_HAND_OFF,
        max_pulls: int = MAX_PULLS,
        watermark: float = PULL_WATERMARK,
        rebalance_every: int = REBALANCE_EVERY,
        migration: MigrationModel | None = None,  # llumnix moves (cluster.py's default)
        out_threshold: float = OUT_THRESHOLD,
    ) -> None:
        if prefill.count < 1 or decode.count < 1:
            raise ValueError(
                f"disaggregated serving needs a prefill and a decode instance at least, got "
                f"{prefill.count} prefill and {decode.count} decode"
            )
        if max_pulls < 1 or not 0 <= watermark < 1:
            raise ValueError(f"need max_pulls >= 1 and 0 <= watermark < 1, got {max_pulls}, {watermark}")
        engines: dict[str, SimEngine] = {}
        roles: dict[str, str] = {}
        for role, group in (("prefill", prefill), ("decode", decode)):
            config = dataclasses.replace(
                group.scheduler_config or scheduler_config, hand_off_after_prefill=role == "prefill"
            )
            for k in range(group.count):
                name = f"{role[0]}{k}"
                engines[name] = SimEngine.build(
                    config, group.cost_model, group.num_blocks, block_size, max_model_len,
                    enable_prefix_caching, name=name,
                )  # fmt: skip
                roles[name] = role
        self._setup(
            engines, block_size, dispatch, load_refresh_s, rebalance_every, migration or MigrationModel(),
            out_threshold,
        )  # fmt: skip
        self.roles = roles
        self.decoders = [i for i, role in roles.items() if role == "decode"]
        self.hand_off = hand_off
        self.max_pulls = max_pulls
        self.watermark = watermark
        for i in self.decoders:  # a pull never takes the room the instance's own requests grow into
            self.inboxes[i].min_free_blocks = watermark_blocks(decode.num_blocks, watermark)
            self.inboxes[i].max_open = MAX_OPEN_PULLS
        self.queue: OrderedDict[str, _Parked] = OrderedDict()  # parked, not yet pulled: oldest first
        self.pulls = {i: 0 for i in self.decoders}  # under way into each decode instance
        self.promised = {i: 0 for i in self.decoders}  # blocks those pulls will take (or took)
        # Of those, blocks of pulls that landed since the last load read: that read's loads do not
        # show them yet, so they stay promised until the next one.
        self.landed = {i: 0 for i in self.decoders}
        self._started = 0  # pulls started, for unique migration ids
        self._result.roles = dict(roles)

    def run(self, requests: list[SimRequest], max_steps: int = 10_000_000) -> ClusterSimResult:
        room = max(e.kv.pool.num_blocks - self.inboxes[i].min_free_blocks for i, e in self._decode_engines())
        for r in requests:  # one that parks and fits no decode instance would wait forever
            blocks = -(-(r.prompt_len + 1) // self.block_size)
            if r.output_len > 1 and blocks > room:
                raise ValueError(
                    f"request {r.request_id}: a prompt of {r.prompt_len} tokens needs {blocks} KV blocks on "
                    f"a decode instance, which can take {room} above its watermark"
                )
        return super().run(requests, max_steps)

    def _decode_engines(self) -> list[tuple[str, SimEngine]]:
        return [(i, self.engines[i]) for i in self.decoders]

    # ---- the hooks of the cluster's event loop ---------------------------------------------------
    def _backlog(self) -> bool:
        return bool(self.queue)

    def _dispatch_loads(self) -> dict[str, InstanceLoad]:
        return {i: load for i, load in self.loads.items() if self.roles[i] == "prefill"}

    def _stepped(self, engine: SimEngine, stepped: list[Request]) -> None:
        parked = engine.scheduler.parked
        for request in stepped:
            if request.request_id in parked:  # parked by this step: noticed when it ends
                self._at(engine.now, functools.partial(self._parked, engine.name, request))

    def _rebalance_loads(self) -> dict[str, InstanceLoad]:
        # As the real Migrator: balance the decode instances; prefills leave by hand-off.
        return {i: load for i, load in self.loads.items() if self.roles[i] == "decode"}

    def _loads_read(self) -> None:
        # Blocks of pulls that landed before this read are in its loads now: no longer promised.
        for i in self.decoders:
            self.promised[i] -= self.landed[i]
            self.landed[i] = 0
        if self.queue:
            self._assign()

    # ---- the coordinator ------------------------------------------------------------------------
    def _parked(self, source: str, request: Request) -> None:
        blocks = -(-(request.num_computed_tokens + 1) // self.block_size)
        self.queue[request.request_id] = _Parked(source, self.clock, blocks)
        self._assign()

    def _assign(self) -> None:
        """Start pulls for the head of the queue while a decode instance has room for it."""
        while self.queue:
            request_id, parked = next(iter(self.queue.items()))
            room: dict[str, int] = {}
            for i in self.decoders:
                load = self.loads.get(i)
                if load is None or self.pulls[i] >= self.max_pulls:
                    continue
                free = load.free_blocks - self.promised[i] - parked.blocks
                if free >= watermark_blocks(load.total_blocks, self.watermark):
                    room[i] = free
            if not room:
                return  # the head waits: FIFO
            destination = max(room, key=lambda i: room[i])
            del self.queue[request_id]
            self._pull(request_id, parked, destination)

    def _pull(self, request_id: str, parked: _Parked, destination: str) -> None:
        """Start a pull: the prefill side hands the parked request's state and KV over (nothing
        changes there); the decode side takes it when the transfer ends."""
        source = self.engines[parked.source].scheduler
        migration = OutgoingMigration.begin(
            source, request_id, f"{request_id}=>{destination}-{self._started}"
        )
        self._started += 1
        if migration.next_stage(source) is not None:
            raise RuntimeError(f"request {request_id} was not parked: a hand-off has nothing to pre-copy")
        request, block_ids = migration.pause(source)
        self.pulls[destination] += 1
        self.promised[destination] += parked.blocks
        pull = _Pull(migration, request, block_ids, parked, destination, self.clock)
        self._at(
            self.clock + self.hand_off.transfer_s(request.num_computed_tokens), lambda: self._landed(pull)
        )

    def _landed(self, pull: _Pull) -> None:
        parked, request, destination = pull.parked, pull.request, pull.destination
        self.pulls[destination] -= 1
        inbox, migration_id = self.inboxes[destination], pull.migration.migration_id
        try:
            inbox.open(migration_id, request.request_id, self.engines[destination].scheduler)
            inbox.reserve(migration_id, len(pull.block_ids))
        except MigrationAborted:  # short of room or seats: it stays parked, first in line
            self.promised[destination] -= parked.blocks
            inbox.abort(migration_id)
            pull.migration.abort(self.engines[parked.source].scheduler)
            self._result.hand_offs_refused += 1
            self.queue[request.request_id] = parked
            self.queue.move_to_end(request.request_id, last=False)
            return  # tried again at the next load read
        num_tokens = request.num_computed_tokens
        self.landed[destination] += parked.blocks
        self._land(pull.migration, request, parked.source, destination)
        self._result.hand_offs.append(
            HandOffRecord(
                request.request_id, parked.source, destination, parked.parked_at, pull.started_at,
                self.clock, num_tokens,
            )
        )  # fmt: skip
        self._result.instances[parked.source].hand_offs_out += 1
        self._result.instances[destination].hand_offs_in += 1
        self._assign()
