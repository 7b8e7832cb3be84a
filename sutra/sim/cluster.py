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
  SimExecutor learns it from the scheduler's NewRequestData, and its trace continues there. The moves
  are sutra/sim/migration.py.

Disaggregated prefill/decode (DistServe) is sutra/sim/disagg.py, a ClusterSimulator whose instances
have roles; the event loop, dispatch and the move records are these.

Not modelled: load reads and pre-copy stages take no time (in the real cluster the reads are RPCs
answered between steps, and pre-copy runs beside the source's steps), nor instance failures, drains,
or multi-sample requests.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from sutra.cluster.affinity import PrefixAffinity, prefix_hashes
from sutra.cluster.dispatch import DEFAULT_DISPATCH, DispatchRequest, make_dispatch_policy
from sutra.cluster.rebalance import OUT_THRESHOLD, MigrationPair, Rebalancer
from sutra.config import SchedulerConfig
from sutra.core.migration import MigrationInbox
from sutra.core.request import Request
from sutra.core.stats import InstanceLoad
from sutra.sim.executor import StepCost
from sutra.sim.migration import DEFAULT_MIGRATION, MigrationModel, MigrationRecord, Move, SimMigrations
from sutra.sim.simulator import SimEngine, SimRequest, SimResult, SimTrace, percentiles

# Mirrors of sutra/cluster/loads.py (which imports Ray, so it is not imported here): the load-read
# period and the reads between two rebalance rounds (tests/sim/test_cluster.py checks they agree).
LOAD_REFRESH_S = 0.1
REBALANCE_EVERY = 5


@dataclass(frozen=True)
class HandOffRecord:
    """One request taken by a decode instance from the prefill instance it parked on."""

    request_id: str
    source: str  # the prefill instance
    destination: str  # the decode instance
    parked_at: float  # simulated seconds: its first token's step ended
    started_at: float  # the pull started: the prefill side read the request and its KV
    landed_at: float  # the decode side reserved its blocks and adopted it; released on the prefill side
    num_tokens: int  # KV handed over (the prompt)

    @property
    def wait_s(self) -> float:
        return self.started_at - self.parked_at

    @property
    def transfer_s(self) -> float:
        return self.landed_at - self.started_at


@dataclass
class InstanceFigures:
    dispatched: int = 0  # requests the dispatch policy placed here
    finished: int = 0  # requests that ended here (moves counted where they ended)
    num_steps: int = 0
    num_preemptions: int = 0
    migrated_out: int = 0
    migrated_in: int = 0
    hand_offs_out: int = 0  # prefill instances: requests decode instances took
    hand_offs_in: int = 0  # decode instances: requests taken


@dataclass
class ClusterSimResult(SimResult):
    """SimResult over the whole cluster, plus what each instance did, every move and hand-off."""

    instances: dict[str, InstanceFigures] = field(default_factory=dict)
    placement: dict[str, str] = field(default_factory=dict)  # request id -> instance dispatched to
    migrations: list[MigrationRecord] = field(default_factory=list)
    migrations_refused: int = 0  # moves a round started that the records called off (room, state)
    roles: dict[str, str] = field(default_factory=dict)  # instance -> prefill | decode; {}: colocated
    hand_offs: list[HandOffRecord] = field(default_factory=list)
    hand_offs_refused: int = 0  # pulls a decode instance's inbox called off (short of room there)

    def summary(self) -> dict[str, object]:
        out = super().summary()
        out["migrations"] = len(self.migrations)
        out["migrations_refused"] = self.migrations_refused
        out["instances"] = {i: dataclasses.asdict(f) for i, f in self.instances.items()}
        if self.roles:
            out["roles"] = dict(self.roles)
            out["hand_offs"] = {
                "count": len(self.hand_offs),
                "refused": self.hand_offs_refused,
                "wait_s": percentiles([h.wait_s for h in self.hand_offs]),
                "transfer_s": percentiles([h.transfer_s for h in self.hand_offs]),
            }
        return out


class ClusterSimulator(SimMigrations):
    """num_instances SimEngines ("i0", "i1", ... as the real cluster names them) in one simulated
    time: the next event is the earliest of a timer (a move landing; in disagg.py also hand-offs and
    park notices), a load read, an arrival and the earliest clock of an instance with work. One run
    per simulator."""

    # An instance with work it cannot schedule looks again at the next load read at the latest (it
    # is waiting for a hand-off to free its pool, which a read may start); colocated: IDLE_STEP_S.
    wake_at_reads = False

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
        migration: MigrationModel = DEFAULT_MIGRATION,
        out_threshold: float = OUT_THRESHOLD,
    ) -> None:
        if num_instances < 1:
            raise ValueError(f"a cluster needs at least one instance, got {num_instances}")
        engines = {
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
        self._setup(engines, block_size, dispatch, load_refresh_s, rebalance_every, migration, out_threshold)

    def _setup(
        self,
        engines: dict[str, SimEngine],
        block_size: int,
        dispatch: str,
        load_refresh_s: float,
        rebalance_every: int,
        migration: MigrationModel,
        out_threshold: float,
    ) -> None:
        if load_refresh_s <= 0 or rebalance_every < 1:
            raise ValueError("load_refresh_s must be > 0 and rebalance_every >= 1")
        self.block_size = block_size
        self.engines = engines
        self.roles: dict[str, str] = {}
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
        self._move: Move | None = None
        self._timers: list[tuple[float, int, Callable[[], None]]] = []  # a heap: (when, order, what)
        self._order = itertools.count()
        self._result = ClusterSimResult({}, 0.0, 0, 0, {i: InstanceFigures() for i in self.engines})

    def _at(self, when: float, action: Callable[[], None]) -> None:
        """Run `action` at simulated time `when` (timers at one time run in the order set)."""
        heapq.heappush(self._timers, (when, next(self._order), action))

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
            t_timer = self._timers[0][0] if self._timers else inf
            busy = [e for e in engines if e.has_work()]
            waiting = bool(self._timers) or self._backlog()
            if not busy and not waiting and t_arrival == inf:
                break
            t_read = start + tick * self.load_refresh_s
            engine = min(busy, key=lambda e: e.now) if busy else None
            t_engine = engine.now if engine is not None else inf
            # On ties: timers (a move lands; a park is noticed, a hand-off lands), loads are read,
            # requests arrive, then engines step.
            if t_timer <= min(t_read, t_arrival, t_engine):
                self.clock, _, action = heapq.heappop(self._timers)
                action()
            elif t_read <= min(t_arrival, t_engine):
                self.clock = t_read
                self._read_loads()
                tick += 1
                if not busy and not waiting:  # idle until the arrival: identical reads
                    tick = self._skip_idle_reads(start, tick, t_arrival)
            elif t_arrival <= t_engine:
                self.clock = t_arrival
                self._dispatch(pending[i], i, affinity)
                i += 1
            else:
                assert engine is not None
                self.clock = t_engine
                before = engine.num_steps
                wake = min(t_arrival, t_timer, t_read if self.wake_at_reads else inf)
                self._stepped(engine, engine.step(wake))
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
            self.rebalancer.pairs(self._rebalance_loads())  # nothing runs: no pair, but its memory moves on
        return last

    # ---- what roles change (sutra/sim/disagg.py) -------------------------------------------
    def _backlog(self) -> bool:
        """Work no instance can step yet that a later read may start (parked requests)."""
        return False

    def _dispatch_loads(self) -> dict[str, InstanceLoad]:
        """The instances new requests may go to, with their loads."""
        return self.loads

    def _stepped(self, engine: SimEngine, stepped: list[Request]) -> None:
        """An instance finished a step; `stepped` got a token in it."""

    def _rebalance_loads(self) -> dict[str, InstanceLoad]:
        """The instances rebalancing moves requests between, with their loads."""
        return self.loads

    def _loads_read(self) -> None:
        """Every instance's load was just read."""

    # ---- loads and dispatch --------------------------------------------------------------------
    def _read_loads(self) -> None:
        mark = self.dispatch.mark()
        self.loads = {i: e.scheduler.load_summary() for i, e in self.engines.items()}
        self.dispatch.loads_refreshed(self.loads, mark)
        self._reads += 1
        self._loads_read()
        if self.dispatch.migrates and self._reads % self.rebalance_every == 0:
            if self._move is None and not self._round:  # the last round is done
                self._round.extend(self.rebalancer.pairs(self._rebalance_loads()))
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
        instance_id = self.dispatch.choose(self._dispatch_loads(), request)
        if hashes:
            self.affinity.record(hashes, instance_id)
        self.engines[instance_id].add(spec)
        self._result.placement[spec.request_id] = instance_id
        self._result.instances[instance_id].dispatched += 1

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
