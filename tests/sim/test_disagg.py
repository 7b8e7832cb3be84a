"""Disaggregated prefill/decode in the simulator: every request parks on a prefill instance after its
first token and finishes on a decode instance with its whole output, no block leaks, a pull never
takes a decode instance below its watermark nor past its pulls under way, the prefill side holds
what decode cannot take yet, and decodes on a decode instance are not held up by prompts."""

from __future__ import annotations

import ast
import random
import statistics
from pathlib import Path

import pytest

from sutra.config import SchedulerConfig
from sutra.core.migration import watermark_blocks
from sutra.sim.capacity import AttainmentSlo
from sutra.sim.cluster import ClusterSimulator
from sutra.sim.cost_model import CostModel
from sutra.sim.disagg import (
    MAX_OPEN_PULLS,
    MAX_PULLS,
    PULL_WATERMARK,
    DisaggSimulator,
    HandOffModel,
    InstanceGroup,
)
from sutra.sim.simulator import SimRequest, Simulator

PER_TOKEN = CostModel((0.005, 2e-5, 1e-4, 0.0, 1e-7, 0.0))  # longer batches take longer
ROOT = Path(__file__).resolve().parents[2]
CONFIG = SchedulerConfig(max_num_batched_tokens=256)


def workload(
    n: int, rate: float = 20.0, prompt: tuple[int, int] = (20, 400), seed: int = 0
) -> list[SimRequest]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        out.append(SimRequest(f"r{i}", t, rng.randint(*prompt), rng.randint(1, 60)))
    return out


def disagg(
    prefill_blocks: int = 256, decode_blocks: int = 256, decode_cost: CostModel = PER_TOKEN, **options
) -> DisaggSimulator:
    options.setdefault("scheduler_config", CONFIG)
    return DisaggSimulator(
        InstanceGroup(options.pop("prefill_count", 1), PER_TOKEN, prefill_blocks),
        InstanceGroup(options.pop("decode_count", 1), decode_cost, decode_blocks),
        **options,
    )


def assert_all_done(sim: DisaggSimulator, result, requests: list[SimRequest]) -> None:
    for r in requests:
        assert len(result.traces[r.request_id].token_times) == r.output_len, r.request_id
    for engine in sim.engines.values():
        assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks, engine.name
        assert engine.kv.num_reserved_blocks == 0 and not engine.scheduler.requests, engine.name
    assert not sim.queue and not any(sim.pulls.values()) and not any(sim.promised.values())


def test_every_request_finishes_as_colocated_and_no_block_is_left_held():
    requests = workload(200)
    colocated = ClusterSimulator(2, CONFIG, PER_TOKEN, num_blocks=256).run(requests)
    sim = disagg()
    result = sim.run(requests)
    assert_all_done(sim, result, requests)
    for r in requests:
        assert len(result.traces[r.request_id].token_times) == len(colocated.traces[r.request_id].token_times)
    handed = {h.request_id: h for h in result.hand_offs}
    assert set(handed) == {r.request_id for r in requests if r.output_len > 1}  # one token: never parks
    assert result.roles == {"p0": "prefill", "d0": "decode"}
    assert result.instances["p0"].dispatched == 200 and result.instances["d0"].dispatched == 0
    assert result.instances["p0"].hand_offs_out == result.instances["d0"].hand_offs_in == len(handed)
    assert result.instances["p0"].finished == 200 - len(handed)
    model = HandOffModel()
    for r in requests:
        trace, hand_off = result.traces[r.request_id], handed.get(r.request_id)
        if hand_off is None:
            continue
        assert hand_off.num_tokens == r.prompt_len  # the prompt's KV, the first token's comes on decode
        assert trace.token_times[0] == hand_off.parked_at  # the first token came from the prefill side
        assert hand_off.parked_at <= hand_off.started_at
        assert hand_off.transfer_s == pytest.approx(model.transfer_s(r.prompt_len))
        assert trace.token_times[1] > hand_off.landed_at  # the second waited for the hand-off
    summary = result.summary()["hand_offs"]
    assert summary["count"] == len(handed) and set(summary["wait_s"]) >= {"p50", "p90"}
    assert summary["transfer_s"]["p50"] == pytest.approx(
        statistics.median(h.transfer_s for h in handed.values()), rel=0.1
    )
    assert "hand_offs" not in colocated.summary()  # colocated runs report as before


def test_pulls_are_first_in_first_out_and_at_most_max_pulls_at_once():
    # Slow hand-offs (100 ms) into roomy decode instances: two pulls at a time each is the limit.
    requests = workload(150, rate=60.0)
    result = disagg(decode_blocks=512, decode_count=2, hand_off=HandOffModel(fixed_s=0.1)).run(requests)
    assert result.hand_offs_refused == 0 and max(h.wait_s for h in result.hand_offs) > 0.1
    by_park = sorted(result.hand_offs, key=lambda h: (h.parked_at, h.started_at))  # a step parks several
    starts = [h.started_at for h in by_park]
    assert starts == sorted(starts)  # strict FIFO: nothing jumps the queue
    for destination in ("d0", "d1"):
        spans = [(h.started_at, h.landed_at) for h in result.hand_offs if h.destination == destination]
        assert spans
        for t, _ in spans:  # pulls under way at each start, this one included
            assert sum(1 for a, b in spans if a <= t < b) <= MAX_PULLS
        assert max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans) == MAX_PULLS


class Watched(DisaggSimulator):
    """Checks the decode instance's pool right after every pull takes its blocks, and the most
    requests a prefill instance held parked."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pulls_seen = 0
        self.most_parked = 0
        self.least_slack = float("inf")  # free blocks above the watermark after a pull

    def _landed(self, pull):
        before = len(self._result.hand_offs)
        super()._landed(pull)
        if len(self._result.hand_offs) > before:  # adopted, not refused
            self.pulls_seen += 1
            kv = self.engines[pull.destination].kv
            slack = kv.num_free_blocks - watermark_blocks(kv.pool.num_blocks, self.watermark)
            assert slack >= 0
            self.least_slack = min(self.least_slack, slack)

    def _stepped(self, engine, stepped):
        super()._stepped(engine, stepped)
        self.most_parked = max(self.most_parked, len(engine.scheduler.parked))


def watched(
    decode_blocks: int, decode_cost: CostModel = PER_TOKEN, watermark: float = PULL_WATERMARK
) -> Watched:
    return Watched(
        InstanceGroup(1, PER_TOKEN, 256),
        InstanceGroup(1, decode_cost, decode_blocks),
        CONFIG,
        watermark=watermark,
    )


@pytest.mark.parametrize("watermark", [PULL_WATERMARK, 0.3])
def test_a_pull_never_takes_a_decode_instance_below_its_watermark(watermark: float):
    requests = workload(120, rate=40.0)
    sim = watched(decode_blocks=80, watermark=watermark)
    result = sim.run(requests)
    assert sim.pulls_seen == len(result.hand_offs) > 50
    assert sim.least_slack < 5  # pulls came close to the mark: the rule was what held them back
    assert sim.inboxes["d0"].min_free_blocks == watermark_blocks(80, watermark)
    assert_all_done(sim, result, requests)


def test_a_tiny_decode_pool_makes_the_prefill_side_wait_and_nothing_is_lost():
    requests = [SimRequest(f"r{i}", 0.01 * i, 150, 40) for i in range(40)]  # 10 blocks each to take
    sim = watched(decode_blocks=24)  # room above the watermark for two at a time
    result = sim.run(requests)
    assert_all_done(sim, result, requests)
    assert sim.most_parked >= 5  # the prefill side held what decode could not take yet
    # A landed pull's blocks stay promised until a load read shows them, so no pull is chosen on
    # loads that miss an adoption and then refused for room.
    assert result.hand_offs_refused == 0
    assert max(h.wait_s for h in result.hand_offs) > 1.0
    assert result.num_preemptions == 0  # parked requests are never preempted; decode keeps its room


def test_the_hand_off_wait_grows_when_decode_is_scarce():
    requests = workload(150, rate=25.0)
    slow = CostModel((0.02, 2e-5, 4e-4, 0.0, 1e-7, 0.0))

    def waits(**options) -> list[float]:
        return [h.wait_s for h in disagg(**options).run(requests).hand_offs]

    plenty = waits(decode_count=2, decode_blocks=512)
    scarce = waits(decode_count=1, decode_blocks=64, decode_cost=slow)
    assert statistics.fmean(scarce) > 10 * max(statistics.fmean(plenty), 1e-3)
    assert statistics.quantiles(scarce, n=10)[-1] > statistics.quantiles(plenty, n=10)[-1]


def test_decodes_on_a_decode_instance_are_not_held_up_by_prompts():
    # Long prompts (each a 0.1-0.2 s prefill, 25-50 decode steps) among short outputs: under
    # prefill_first an admitted prompt stalls the colocated decodes for its whole prefill, which the
    # unlucky requests' TPOT shows; decode instances never run a prompt. The hand-off (about 55 ms
    # here) is paid once per request instead, so the median TPOT is a little higher.
    expensive_prefill = CostModel((0.004, 1e-4, 1e-4, 0.0, 1e-8, 0.0))
    rng = random.Random(1)
    requests = [SimRequest(f"r{i}", 0.25 * i + rng.random() * 0.12, rng.randint(1000, 2000), rng.randint(20, 60))
                for i in range(80)]  # fmt: skip
    prefill_first = SchedulerConfig(max_num_batched_tokens=4096, mode="prefill_first")
    colocated = ClusterSimulator(2, prefill_first, expensive_prefill, num_blocks=1024).run(requests)
    pd = DisaggSimulator(
        InstanceGroup(1, expensive_prefill, 1024),
        InstanceGroup(1, expensive_prefill, 1024),
        prefill_first,
        hand_off=HandOffModel(0.02, 2.3e-5),  # a fast link: 20 ms plus 23 us per token
    ).run(requests)
    tpot = {name: r.summary()["tpot_s"] for name, r in (("colocated", colocated), ("pd", pd))}
    assert tpot["colocated"]["p99"] > 2 * tpot["colocated"]["p50"]  # the stalls
    assert tpot["pd"]["p99"] < 1.5 * tpot["pd"]["p50"]
    assert tpot["pd"]["p99"] < 0.75 * tpot["colocated"]["p99"]
    strict = AttainmentSlo(ttft_s=1.0, tpot_s=0.009, target=0.99)
    assert strict.meets(pd) and not strict.meets(colocated)


def test_only_prefill_instances_take_new_requests():
    requests = workload(80)
    result = disagg(prefill_count=2, decode_count=2).run(requests)
    assert set(result.placement.values()) == {"p0", "p1"}
    assert result.instances["d0"].dispatched == result.instances["d1"].dispatched == 0
    assert {h.source for h in result.hand_offs} == {"p0", "p1"}
    assert {h.destination for h in result.hand_offs} == {"d0", "d1"}


def test_bad_setups_are_refused():
    with pytest.raises(ValueError, match="at least"):
        DisaggSimulator(InstanceGroup(0, PER_TOKEN, 64), InstanceGroup(1, PER_TOKEN, 64), CONFIG)
    with pytest.raises(ValueError, match="decode instance"):
        disagg(decode_blocks=16).run([SimRequest("big", 0.0, 400, 5)])  # 26 blocks > 15 above the mark
    with pytest.raises(ValueError, match="DisaggSimulator"):
        Simulator(SchedulerConfig(hand_off_after_prefill=True), PER_TOKEN, num_blocks=64)


def test_the_mirrored_constants_match_the_coordinator():
    def constants(path: str) -> dict[str, object]:
        tree = ast.parse((ROOT / path).read_text())
        return {
            node.targets[0].id: ast.literal_eval(node.value)
            for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id.isupper()
            and isinstance(node.value, ast.Constant)
        }  # fmt: skip

    assert constants("sutra/cluster/handoff.py")["MAX_PULLS"] == MAX_PULLS
    pull = constants("sutra/cluster/pull.py")
    assert (pull["PULL_WATERMARK"], pull["MAX_OPEN_PULLS"]) == (PULL_WATERMARK, MAX_OPEN_PULLS)
