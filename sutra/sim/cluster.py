"""The simulator's cluster mode: several SimEngines behind the real cluster's global scheduling, so a
plan made here follows the rules of `sutra serve --instances N --dispatch ...`.

- Dispatch: each arrival is placed by the real DispatchPolicy (sutra/cluster/dispatch.py) from the
  loads (`Scheduler.load_summary`) read every `load_refresh_s`, with the client's mark() /
  loads_refreshed() accounting, so a burst between two reads spreads as it does in the real cluster.
  Prompts get prefix affinity (sutra/cluster/affinity.py) exactly as the client computes it, unless
  no request of the workload gives token ids: generated prompts are unique and could never match.
- Rebalancing (llumnix): every `rebalance_every` load reads a round runs, unless the last one is still
  moving: Rebalancer.pairs on the loads just read, then pair by pair, one move at a time as the
  Migrator awaits them, the source's candidate (MigrationSource.candidate's rule) moves through the
  real core records: OutgoingMigration on the source's scheduler (begin, pre-copy stages, pause), a
  MigrationInbox reserving the destination's blocks, and on commit Scheduler.adopt (num_computed_tokens
  kept) then the source's release. A move refused for room leaves the request where it was.
- A move's cost is its downtime only (MigrationModel): the request makes no progress from the source's
  next step boundary until `downtime_s(tokens)` later; then it runs on the destination, whose
  SimExecutor learns it from the scheduler's NewRequestData, and its trace continues there.

Not modelled: load reads and pre-copy stages take no time (in the real cluster the reads are RPCs
answered between steps, and pre-copy runs beside the source's steps), nor instance failures, drains,
or multi-sample requests.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field

from sutra.cluster.affinity import PrefixAffinity, prefix_hashes
from sutra.cluster.dispatch import DEFAULT_DISPATCH, DispatchRequest, make_dispatch_policy
from sutra.cluster.rebalance import OUT_THRESHOLD, MigrationPair, Rebalancer
from sutra.config import SchedulerConfig
from sutra.core.migration import MigrationAborted, MigrationInbox, OutgoingMigration
from sutra.core.request import Request
from sutra.core.stats import InstanceLoad
from sutra.sim.executor import StepCost
from sutra.sim.simulator import SimEngine, SimRequest, SimResult, SimTrace

# Mirrors of sutra/cluster/client.py (which imports Ray, so it is not imported here): the load-read
# period and the reads between two rebalance rounds (tests/sim/test_cluster.py checks they agree).
LOAD_REFRESH_S = 0.1
REBALANCE_EVERY = 5


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


@dataclass(frozen=True)
class MigrationRecord:
    request_id: str
    source: str
    destination: str
    paused_at: float  # simulated seconds
    resumed_at: float  # it joins the destination's next step from here
    num_tokens: int  # context at the pause


@dataclass
class InstanceFigures:
    dispatched: int = 0  # requests the dispatch policy placed here
    finished: int = 0  # requests that ended here (moves counted where they ended)
    num_steps: int = 0
    num_preemptions: int = 0
    migrated_out: int = 0
    migrated_in: int = 0


@dataclass
class ClusterSimResult(SimResult):
    """SimResult over the whole cluster, plus what each instance did and every move."""

    instances: dict[str, InstanceFigures] = field(default_factory=dict)
    placement: dict[str, str] = field(default_factory=dict)  # request id -> instance dispatched to
    migrations: list[MigrationRecord] = field(default_factory=list)
    migrations_refused: int = 0  # moves a round started that the records called off (room, state)

    def summary(self) -> dict[str, object]:
        out = super().summary()
        out["migrations"] = len(self.migrations)
        out["migrations_refused"] = self.migrations_refused
        out["instances"] = {i: dataclasses.asdict(f) for i, f in self.instances.items()}
        return out


@dataclass
class _Move:
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


class ClusterSimulator:
    """num_instances SimEngines ("i0", "i1", ... as the real cluster names them) in one simulated
    time: the next event is the earliest of a finishing move, a load read, an arrival and the
    earliest clock of an instance with work. One run per simulator."""

    def __init__(
        self,
        num_instances: int,
        scheduler_config: SchedulerConfig,
        cost_model: StepCost,
        num_blocks: int,
        block_size: int = 16,
        max_model_len: int = 8192,
        enable_prefix_caching: bool = True,
        dispatch: str = DEFAULT_DISPATCH,
        load_refresh_s: float = LOAD_REFRESH_S,
        rebalance_every: int = REBALANCE_EVERY,
        migration: MigrationModel = MigrationModel(),
        out_threshold: float = OUT_THRESHOLD,
    ) -> None:
        if num_instances < 1:
            raise ValueError(f"a cluster needs at least one instance, got {num_instances}")
        if load_refresh_s <= 0 or rebalance_every < 1:
            raise ValueError("load_refresh_s must be > 0 and rebalance_every >= 1")
        self.block_size = block_size
        self.engines = {
            f"i{k}": SimEngine.build(
                scheduler_config,
                cost_model,
                num_blocks,
                block_size,
                max_model_len,
                enable_prefix_caching,
                name=f"i{k}",
            )
            for k in range(num_instances)
        }
        self.dispatch = make_dispatch_policy(dispatch)
        self.load_refresh_s = load_refresh_s
        self.rebalance_every = rebalance_every
        self.migration = migration
        self.rebalancer = Rebalancer(out_threshold)
        self.affinity = PrefixAffinity()
        self.clock = 0.0
        self.inboxes = {i: MigrationInbox(e.kv, clock=lambda: self.clock) for i, e in self.engines.items()}
        self.loads: dict[str, InstanceLoad] = {}
        self._ran = False
        self._reads = 0
        self._round: deque[MigrationPair] = deque()
        self._move: _Move | None = None
        self._result = ClusterSimResult({}, 0.0, 0, 0, {i: InstanceFigures() for i in self.engines})

    # ---- the event loop ------------------------------------------------------------------------
    def run(self, requests: list[SimRequest], max_steps: int = 10_000_000) -> ClusterSimResult:
        if self._ran:
            raise RuntimeError("a ClusterSimulator runs once: its instances keep their state")
        self._ran = True
        pending = sorted(requests, key=lambda r: r.arrival_time)
        if len({r.request_id for r in pending}) != len(pending):
            raise ValueError("request ids must be unique")
        start = pending[0].arrival_time if pending else 0.0
        for engine in self.engines.values():
            engine.now = start
        affinity = any(r.prompt_token_ids is not None for r in pending)
        engines = list(self.engines.values())
        inf = float("inf")
        tick, i, steps = 0, 0, 0
        while True:
            t_arrival = pending[i].arrival_time if i < len(pending) else inf
            t_move = self._move.record.resumed_at if self._move is not None else inf
            busy = [e for e in engines if e.has_work()]
            if not busy and self._move is None and t_arrival == inf:
                break
            t_read = start + tick * self.load_refresh_s
            engine = min(busy, key=lambda e: e.now) if busy else None
            t_engine = engine.now if engine is not None else inf
            # On ties: a move lands, loads are read, requests arrive, then engines step.
            if t_move <= min(t_read, t_arrival, t_engine):
                self.clock = t_move
                self._finish_move()
            elif t_read <= min(t_arrival, t_engine):
                self.clock = t_read
                self._read_loads()
                tick += 1
                if not busy and self._move is None:  # idle until the arrival: identical reads
                    tick = self._skip_idle_reads(start, tick, t_arrival)
            elif t_arrival <= t_engine:
                self.clock = t_arrival
                self._dispatch(pending[i], i, affinity)
                i += 1
            else:
                assert engine is not None
                self.clock = t_engine
                before = engine.num_steps
                engine.step(min(t_arrival, t_move))
                steps += engine.num_steps - before
                if steps >= max_steps:
                    raise RuntimeError(f"the simulation did not finish within {max_steps} steps")
        return self._finish(pending, start)

    def _skip_idle_reads(self, start: float, tick: int, t_arrival: float) -> int:
        """Every instance is idle until the next arrival, so the reads before it would all return
        the loads just read: count them (the rebalance period keeps its phase) without doing them."""
        last = int((t_arrival - start) / self.load_refresh_s)  # the last read at or before the arrival
        while start + last * self.load_refresh_s > t_arrival:
            last -= 1
        if last <= tick:
            return tick
        before, self._reads = self._reads, self._reads + last - tick
        if self.dispatch.migrates and self._reads // self.rebalance_every > before // self.rebalance_every:
            self.rebalancer.pairs(self.loads)  # nothing runs: no pair, but its memory moves on
        return last

    def _read_loads(self) -> None:
        mark = self.dispatch.mark()
        self.loads = {i: e.scheduler.load_summary() for i, e in self.engines.items()}
        self.dispatch.loads_refreshed(self.loads, mark)
        self._reads += 1
        if self.dispatch.migrates and self._reads % self.rebalance_every == 0:
            if self._move is None and not self._round:  # the last round is done
                self._round.extend(self.rebalancer.pairs(self.loads))
                self._next_move()

    def _dispatch(self, spec: SimRequest, index: int, affinity: bool) -> None:
        tokens = spec.prompt_token_ids
        if tokens is None:  # unique across the cluster for 50,000 requests: no accidental hits
            seed = index * 7919
            tokens = [(seed + k * 31) % 50_000 + 17 for k in range(spec.prompt_len)]
            spec = dataclasses.replace(spec, prompt_token_ids=tokens)
        hashes = prefix_hashes(tokens, self.block_size, spec.spec.cache_salt) if affinity else []
        request = DispatchRequest(
            num_requests=1,
            num_prompt_tokens=len(tokens),
            demand_blocks=-(-(len(tokens) + 1) // self.block_size),  # +1: the first output token
            preferred=self.affinity.lookup(hashes) if hashes else None,
        )
        instance_id = self.dispatch.choose(self.loads, request)
        if hashes:
            self.affinity.record(hashes, instance_id)
        self.engines[instance_id].add(spec)
        self._result.placement[spec.request_id] = instance_id
        self._result.instances[instance_id].dispatched += 1

    # ---- rebalancing -------------------------------------------------------------------------
    def _next_move(self) -> None:
        """Start the round's next move that can start; the rest wait until it lands."""
        while self._round and self._move is None:
            self._start_move(self._round.popleft())

    def _start_move(self, pair: MigrationPair) -> None:
        source = self.engines[pair.source]
        request_id = migration_candidate(source)
        if request_id is None:
            return
        migration_id = f"{request_id}->{pair.destination}-{len(self._result.migrations)}"
        inbox = self.inboxes[pair.destination]
        outgoing: OutgoingMigration | None = None
        try:
            outgoing = OutgoingMigration.begin(source.scheduler, request_id, migration_id)
            inbox.open(migration_id, request_id)
            while (stage := outgoing.next_stage(source.scheduler)) is not None:
                inbox.reserve(migration_id, len(stage))
            request, rest = outgoing.pause(source.scheduler)
            inbox.reserve(migration_id, len(rest))
        except MigrationAborted:
            inbox.abort(migration_id)
            if outgoing is not None:
                outgoing.abort(source.scheduler)
            self._result.migrations_refused += 1
            return
        # The source's state is as of its step in flight: it pauses when that step ends.
        paused_at = max(self.clock, source.now)
        resumed_at = paused_at + self.migration.downtime_s(request.num_tokens)
        record = MigrationRecord(
            request_id, pair.source, pair.destination, paused_at, resumed_at, request.num_tokens
        )
        self._move = _Move(outgoing, request, record)  # the destination adopts it when it lands

    def _finish_move(self) -> None:
        move = self._move
        assert move is not None
        self._move = None
        record, old = move.record, move.request
        source, destination = self.engines[record.source], self.engines[record.destination]
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
            destination.now = max(destination.now, record.resumed_at)
        migration_id = move.migration.migration_id
        self.inboxes[record.destination].commit(migration_id, destination.scheduler, request)
        move.migration.commit(source.scheduler)  # released there: blocks and runner state
        destination.traces[record.request_id] = source.traces.pop(record.request_id)
        self._result.migrations.append(record)
        self._result.instances[record.source].migrated_out += 1
        self._result.instances[record.destination].migrated_in += 1
        self._next_move()

    # ---- the result ----------------------------------------------------------------------------
    def _finish(self, pending: list[SimRequest], start: float) -> ClusterSimResult:
        result = self._result
        traces: dict[str, SimTrace] = {}
        for instance_id, engine in self.engines.items():
            traces.update(engine.traces)
            figures = result.instances[instance_id]
            figures.finished = len(engine.traces)
            figures.num_steps = engine.num_steps
            figures.num_preemptions = engine.scheduler.num_preemptions
        result.traces = {r.request_id: traces[r.request_id] for r in pending}
        result.duration_s = max(e.now for e in self.engines.values()) - start if pending else 0.0
        result.num_steps = sum(f.num_steps for f in result.instances.values())
        result.num_preemptions = sum(f.num_preemptions for f in result.instances.values())
        return result
