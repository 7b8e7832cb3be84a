"""Policy registry, SchedulerConfig policy options, policy files, and the RPM limiter."""

from __future__ import annotations

import json
import sys

import pytest

from sutra.config import SchedulerConfig
from sutra.core.policies import POLICIES, LCFPolicy, PriorityPolicy, RPMPolicy, VTCPolicy, make_policy
from sutra.core.policies.config_file import apply_policy_file, load_policy_file
from sutra.core.request import RequestStatus
from tests.core.fake_runner import FakeRunner, make_request, make_scheduler, run_to_completion, step


def test_registry_builds_each_policy_with_its_options():
    assert set(POLICIES) == {"fcfs", "vtc", "lcf", "rpm", "priority", "priority-vtc"}
    cfg = SchedulerConfig(
        policy="vtc", client_weights={"a": 3.0}, vtc_prompt_weight=0.5, length_prediction=True, rpm_limit=7
    )
    vtc = make_policy(cfg)
    assert isinstance(vtc, VTCPolicy) and vtc.lift and vtc.length_prediction
    assert (vtc.prompt_weight, vtc.output_weight, vtc.weight("a"), vtc.weight("b")) == (0.5, 2.0, 3.0, 1.0)
    cfg.policy = "lcf"
    lcf = make_policy(cfg)
    assert isinstance(lcf, LCFPolicy) and not lcf.lift
    cfg.policy = "rpm"
    rpm = make_policy(cfg, clock=lambda: 5.0)
    assert isinstance(rpm, RPMPolicy) and rpm.limit == 7 and rpm.clock() == 5.0
    cfg.policy = "priority-vtc"
    prio = make_policy(cfg)
    r = make_request(client="a", priority=2)
    prio.add(r)
    assert isinstance(prio, PriorityPolicy) and prio.pop() is r
    prio.on_scheduled(r, 8)
    assert prio._classes[2].counters["a"] == pytest.approx(8 * 0.5 / 3.0)  # VTC inside the class
    cfg.policy = "nope"
    with pytest.raises(ValueError, match="unknown scheduling policy 'nope'"):
        make_policy(cfg)


@pytest.mark.parametrize(
    "field,value",
    [
        ("policy", "wfq"),
        ("client_weights", {"a": 0}),
        ("client_weights", {"a": float("nan")}),
        ("client_weights", {"a": "2"}),
        ("client_weights", [("a", 1.0)]),
        ("vtc_prompt_weight", -1.0),
        ("vtc_output_weight", float("inf")),
        ("length_prediction", "yes"),
        ("rpm_limit", 0),
        ("rpm_limit", 2.5),
        ("rpm_limit", float("inf")),
        ("rpm_limit", True),
        ("client_idle_ttl_s", -1.0),
        ("client_idle_ttl_s", float("nan")),
        ("client_idle_ttl_s", "600"),
        ("max_idle_clients", -1),
        ("max_idle_clients", 2.5),
    ],
)
def test_invalid_policy_options(field, value):
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**{field: value})


def test_vtc_token_weights_not_both_zero():
    with pytest.raises(ValueError, match="both be 0"):
        SchedulerConfig(vtc_prompt_weight=0.0, vtc_output_weight=0.0)
    assert SchedulerConfig(vtc_prompt_weight=0.0).vtc_output_weight == 2.0


def test_policy_file_json_and_toml(tmp_path):
    path = tmp_path / "weights.json"
    path.write_text(json.dumps({"policy": "vtc", "client_weights": {"alice": 1, "bob": 3}}))
    assert load_policy_file(path) == {"policy": "vtc", "client_weights": {"alice": 1, "bob": 3}}
    cfg = SchedulerConfig(max_num_seqs=7)
    apply_policy_file(cfg, path)
    assert (cfg.policy, cfg.client_weights, cfg.max_num_seqs) == ("vtc", {"alice": 1, "bob": 3}, 7)
    if sys.version_info >= (3, 11):
        toml = tmp_path / "weights.toml"
        toml.write_text(
            '[scheduler]\npolicy = "rpm"\nrpm_limit = 12\n[scheduler.client_weights]\nteam = 2.5\n'
        )
        apply_policy_file(cfg, toml)
        assert (cfg.policy, cfg.rpm_limit, cfg.client_weights) == ("rpm", 12, {"team": 2.5})


def test_client_state_bounds_reach_every_policy(tmp_path):
    path = tmp_path / "bounds.json"
    path.write_text(json.dumps({"policy": "vtc", "client_idle_ttl_s": 30, "max_idle_clients": 5}))
    cfg = SchedulerConfig()
    apply_policy_file(cfg, path)
    assert (cfg.client_idle_ttl_s, cfg.max_idle_clients) == (30, 5)
    vtc = make_policy(cfg)
    assert (vtc._idle.ttl_s, vtc._idle.max_idle) == (30, 5)
    cfg.policy = "rpm"
    assert make_policy(cfg).max_clients == 5
    cfg.policy = "priority-vtc"
    prio = make_policy(cfg)
    assert (prio._idle.ttl_s, prio.max_idle_clients) == (30, 5)
    prio.add(make_request(client="a", priority=1))
    assert prio._classes[1]._idle.max_idle == 5


@pytest.mark.parametrize(
    "text,match",
    [
        ('{"policy": "vtc", "max_num_seqs": 4}', "unknown policy option"),
        ('{"client_weights": {"a": -1}}', "client_weights"),
        ("[1, 2]", "expected a table"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_policy_file_leaves_config_unchanged(tmp_path, text, match):
    path = tmp_path / "policy.json"
    path.write_text(text)
    cfg = SchedulerConfig(policy="priority")
    with pytest.raises(ValueError, match=match):
        apply_policy_file(cfg, path)
    assert cfg.policy == "priority" and cfg.client_weights == {}
    with pytest.raises(ValueError, match="cannot read"):
        load_policy_file(tmp_path / "missing.json")


def test_rpm_limits_each_client_per_minute():
    now = [0.0]
    policy = RPMPolicy(limit=2, client_weights={"big": 2.0}, clock=lambda: now[0])
    scheduler, runner = make_scheduler(policy=policy), FakeRunner()
    a = [make_request(8, max_tokens=2, client="a") for _ in range(4)]
    b = make_request(8, max_tokens=2, client="b")
    big = [make_request(8, max_tokens=2, client="big") for _ in range(5)]
    for r in a + [b] + big:
        scheduler.add_request(r)
    out = step(scheduler, runner)
    started = {n.request_id for n in out.new_requests}
    # Two of a's, b's (which arrived after all of a's), and four of big's (weight 2): the rest wait,
    # though the engine has room.
    assert started == {r.request_id for r in a[:2] + [b] + big[:4]}
    for _ in range(10):
        step(scheduler, runner)
    assert scheduler.num_waiting == 3 and scheduler.running == []  # idle while throttled
    now[0] = 59.9
    assert step(scheduler, runner).new_requests == []
    now[0] = 60.0  # the first starts leave the window
    started = {n.request_id for n in step(scheduler, runner).new_requests}
    assert started == {r.request_id for r in a[2:] + big[4:]}
    run_to_completion(scheduler, runner)
    assert all(r.num_output_tokens == 2 for r in a + [b] + big)


@pytest.mark.parametrize("mode", ["sarathi", "no_chunking", "prefill_first"])
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_keeps_the_scheduler_invariants(policy, mode):
    options = {"length_prediction": True} if policy in ("vtc", "lcf") else {}
    if policy == "rpm":
        options["rpm_limit"] = 1000
    scheduler = make_scheduler(num_blocks=20, budget=48, max_seqs=6, mode=mode, policy=policy, **options)
    runner = FakeRunner()
    reqs = [
        make_request(5 + (i * 37) % 90, max_tokens=3 + i % 11, client=f"c{i % 3}", priority=i % 3)
        for i in range(30)
    ]
    for i, r in enumerate(reqs):
        scheduler.add_request(r)
        if i % 3 == 0:
            out = step(scheduler, runner)
            assert out.total_num_scheduled_tokens <= 48 or mode != "sarathi"
    waiting = [r.request_id for r in reqs if r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)]
    aborted = [r.request_id for r in scheduler.running[:2]] + waiting[-2:]  # some of each
    assert len(aborted) == 4
    scheduler.abort_requests(aborted)
    run_to_completion(scheduler, runner)
    assert scheduler.num_waiting == 0 and not scheduler.running
    assert scheduler.kv.num_free_blocks == 20
    for r in reqs:
        if r.request_id in aborted:
            assert r.status is RequestStatus.FINISHED_ABORTED
        else:
            assert (
                r.status is RequestStatus.FINISHED_LENGTH
                and r.num_output_tokens == r.sampling_params.max_tokens
            )
