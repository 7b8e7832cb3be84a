"""The cluster simulator places and moves requests by the real cluster's rules: one instance is the
plain simulator, round-robin counts while least-load weighs loads, a burst between two load reads
spreads through the pending-dispatch accounting, prefix affinity keeps shared prompts together, and
llumnix moves a request off a crowded instance with its tokens and its KV accounted for."""

from __future__ import annotations

import ast
import random
import subprocess
import sys
from pathlib import Path

import pytest

from sutra.cluster.rebalance import MigrationPair
from sutra.config import SchedulerConfig
from sutra.core.request import RequestStatus
from sutra.sim.cluster import LOAD_REFRESH_S, REBALANCE_EVERY, ClusterSimulator
from sutra.sim.cost_model import CostModel
from sutra.sim.migration import MigrationModel, migration_candidate
from sutra.sim.simulator import SimRequest, Simulator

CONSTANT = CostModel((0.01, 0.0, 0.0, 0.0, 0.0, 0.0))  # every step takes 10 ms
PER_TOKEN = CostModel((0.005, 2e-5, 1e-4, 0.0, 1e-7, 0.0))  # longer batches take longer
ROOT = Path(__file__).resolve().parents[2]


def mixed_workload(n: int, seed: int = 0) -> list[SimRequest]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(30.0) if i % 10 else 2.0  # bursts, with idle gaps between them
        out.append(SimRequest(f"r{i}", t, rng.randint(20, 600), rng.randint(1, 80)))
    return out


@pytest.mark.parametrize("dispatch", ["round-robin", "least-load", "llumnix"])
def test_one_instance_is_the_plain_simulator(dispatch):
    config = SchedulerConfig(max_num_batched_tokens=256)
    requests = mixed_workload(60)
    alone = Simulator(config, PER_TOKEN, num_blocks=96).run(requests)
    cluster = ClusterSimulator(1, config, PER_TOKEN, num_blocks=96, dispatch=dispatch).run(requests)
    assert alone.num_preemptions > 0  # the small pool makes the comparison cover preemption too
    assert list(cluster.traces) == list(alone.traces)
    for rid, trace in alone.traces.items():
        assert cluster.traces[rid].token_times == trace.token_times
        assert cluster.traces[rid].num_preemptions == trace.num_preemptions
    assert (cluster.num_steps, cluster.num_preemptions) == (alone.num_steps, alone.num_preemptions)
    assert cluster.duration_s == alone.duration_s
    assert cluster.migrations == [] and cluster.instances["i0"].dispatched == 60


def test_round_robin_spreads_by_count():
    requests = [SimRequest(f"r{i}", 0.05 * i, 16 + 40 * (i % 3), 1 + 30 * (i % 4)) for i in range(12)]
    result = ClusterSimulator(4, SchedulerConfig(), CONSTANT, num_blocks=64, dispatch="round-robin").run(
        requests
    )
    assert [f.dispatched for f in result.instances.values()] == [3, 3, 3, 3]
    assert [result.placement[f"r{i}"] for i in range(5)] == ["i0", "i1", "i2", "i3", "i0"]


def test_least_load_keeps_a_long_prompt_off_the_busy_instance():
    # A holds most of i0's 64 blocks (50 by t = 1 s, 63 at its end near t = 2 s); B is small; C is
    # long. Round-robin puts C next to A, where it waits for room until A ends; least-load sends it
    # to the idle instance.
    requests = [
        SimRequest("A", 0.0, 600, 400),
        SimRequest("B", 0.5, 16, 2),
        SimRequest("C", 1.0, 400, 10),
    ]

    def run(dispatch: str):
        sim = ClusterSimulator(2, SchedulerConfig(), PER_TOKEN, num_blocks=64, dispatch=dispatch)
        return sim.run(requests)

    rr, ll = run("round-robin"), run("least-load")
    assert rr.placement == {"A": "i0", "B": "i1", "C": "i0"}
    assert ll.placement == {"A": "i0", "B": "i1", "C": "i1"}
    assert ll.traces["C"].ttft < 0.1
    assert rr.traces["C"].ttft > 1.0  # A's remaining decodes
    assert rr.traces["C"].token_times[0] >= rr.traces["A"].token_times[-1]


def test_a_burst_between_load_reads_spreads_over_the_instances():
    # Eight arrivals at one instant see the same loads; the pending dispatches spread them.
    requests = [SimRequest(f"r{i}", 1.0, 100, 20) for i in range(8)]
    result = ClusterSimulator(4, SchedulerConfig(), CONSTANT, num_blocks=64, dispatch="least-load").run(
        requests
    )
    assert [f.dispatched for f in result.instances.values()] == [2, 2, 2, 2]


def test_the_load_refresh_period_decides_what_dispatch_sees():
    # A long request on i0, then short ones that end before the next arrives. Fresh loads show i1
    # empty each time; loads read once, at the start, leave every dispatch pending, and the pending
    # short requests soon make i1 look more crowded than i0.
    requests = [SimRequest("A", 0.0, 800, 300)] + [
        SimRequest(f"s{k}", 1.0 + 0.1 * k, 32, 4) for k in range(6)
    ]

    def on_i0(load_refresh_s: float) -> int:
        sim = ClusterSimulator(2, SchedulerConfig(), CONSTANT, num_blocks=256, load_refresh_s=load_refresh_s)
        result = sim.run(requests)
        assert result.placement["A"] == "i0"
        return sum(result.placement[f"s{k}"] == "i0" for k in range(6))

    assert on_i0(LOAD_REFRESH_S) == 0
    assert on_i0(1000.0) > 0


def test_prefix_affinity_keeps_a_shared_prompt_on_its_instance():
    prefix = list(range(1000, 1512))  # 32 blocks

    def run(second: list[int]):
        requests = [
            SimRequest("a", 0.0, 600, 50, prompt_token_ids=prefix + list(range(88))),
            SimRequest("b", 0.3, len(second), 10, prompt_token_ids=second),
        ]
        sim = ClusterSimulator(2, SchedulerConfig(), CONSTANT, num_blocks=128, dispatch="least-load")
        return sim, sim.run(requests)

    sim, result = run(prefix + list(range(5000, 5040)))
    assert result.placement == {"a": "i0", "b": "i0"}  # i1 is freer, but i0 holds the prefix
    assert sim.engines["i0"].kv.prefix_hits >= len(prefix)
    _, other = run(list(range(7000, 7552)))
    assert other.placement == {"a": "i0", "b": "i1"}


def crowded_workload() -> list[SimRequest]:
    # At one instant: long, short, long, short... Least-load alternates between the two instances,
    # so every long request lands on i0; the short ones end fast and leave i1 idle.
    requests = []
    for k in range(4):
        requests.append(SimRequest(f"long{k}", 0.0, 100, 300))
        requests.append(SimRequest(f"short{k}", 0.0, 100, 3))
    return requests


def test_llumnix_moves_requests_off_a_crowded_instance():
    sim = ClusterSimulator(2, SchedulerConfig(), CONSTANT, num_blocks=64, dispatch="llumnix")
    result = sim.run(crowded_workload())
    assert {result.placement[f"long{k}"] for k in range(4)} == {"i0"}
    assert result.migrations, "no request moved"
    assert result.instances["i0"].migrated_out == len(result.migrations) == result.instances["i1"].migrated_in
    model = MigrationModel()
    for move in result.migrations:
        assert (move.source, move.destination) == ("i0", "i1")
        assert move.resumed_at - move.paused_at == pytest.approx(model.downtime_s(move.num_tokens))
        trace = result.traces[move.request_id]
        assert len(trace.token_times) == 300  # every token once, from both instances
        before = [t for t in trace.token_times if t <= move.paused_at]
        after = [t for t in trace.token_times if t > move.paused_at]
        assert before and after and after[0] >= move.resumed_at
        assert len(before) == move.num_tokens - 100  # the tokens the source produced
    for rid, trace in result.traces.items():
        assert len(trace.token_times) == (300 if rid.startswith("long") else 3)
    for engine in sim.engines.values():
        assert engine.kv.num_free_blocks == 64 and engine.kv.num_reserved_blocks == 0
        assert not engine.has_work()
    assert result.summary()["migrations"] == len(result.migrations)

    plain = ClusterSimulator(2, SchedulerConfig(), CONSTANT, num_blocks=64, dispatch="least-load")
    balanced = plain.run(crowded_workload())
    assert balanced.migrations == [] and balanced.num_preemptions > result.num_preemptions


def test_the_mirrored_constants_match_the_cluster_client():
    tree = ast.parse((ROOT / "sutra/cluster/loads.py").read_text())
    values = {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Name)
        and node.targets[0].id in ("LOAD_REFRESH_S", "REBALANCE_EVERY")
    }
    assert values["LOAD_REFRESH_S"] == LOAD_REFRESH_S
    assert values["REBALANCE_EVERY"] == REBALANCE_EVERY


def test_the_cluster_simulator_needs_no_ray():
    code = "import sys, sutra.sim.cluster; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_the_candidate_is_the_one_the_real_source_offers():
    from sutra.engine.migration import MigrationSource

    class View:  # what MigrationSource.candidate reads of an engine
        def __init__(self, engine):
            self.scheduler, self.kv = engine.scheduler, engine.kv

        def num_samples(self, request_id):
            return 1 if request_id in self.scheduler.requests else 0

    sim = ClusterSimulator(1, SchedulerConfig(max_num_batched_tokens=128), CONSTANT, num_blocks=256)
    engine = sim.engines["i0"]
    for k, prompt_len in enumerate([300, 40, 90, 500, 20]):
        engine.add(SimRequest(f"r{k}", 0.0, prompt_len, 50))
    real = MigrationSource(View(engine))
    seen = set()
    for _ in range(12):
        engine.step()
        seen.add(migration_candidate(engine))
        assert migration_candidate(engine) == real.candidate()
    assert len(seen) > 1


def test_a_move_the_destination_has_no_room_for_is_called_off():
    sim = ClusterSimulator(2, SchedulerConfig(), CONSTANT, num_blocks=32, dispatch="round-robin")
    source, destination = sim.engines["i0"], sim.engines["i1"]
    source.add(SimRequest("a", 0.0, 200, 50))  # 13 blocks
    destination.add(SimRequest("b", 0.0, 400, 50))  # 26 of 32 blocks
    for _ in range(5):
        source.step()
        destination.step()
    free = source.kv.num_free_blocks, destination.kv.num_free_blocks
    sim._start_move(MigrationPair("i0", "i1"))
    assert sim._move is None and sim._result.migrations_refused == 1
    assert (source.kv.num_free_blocks, destination.kv.num_free_blocks) == free
    assert destination.kv.num_reserved_blocks == 0
    assert source.scheduler.requests["a"].status is RequestStatus.RUNNING
