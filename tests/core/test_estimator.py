"""Completion-time estimates: the online latency fit, and forward simulation against the fake runner
with a synthetic step time."""

from __future__ import annotations

import random

import pytest

from sutra.core.estimator import CompletionEstimator, StepLatencyModel
from tests.core.fake_runner import FakeRunner, make_request, make_scheduler, step

TRUE = (0.004, 3e-5, 2e-4)  # the synthetic machine: a + b * tokens + c * seqs seconds per step


def _step_time(tokens: int, seqs: int) -> float:
    return TRUE[0] + TRUE[1] * tokens + TRUE[2] * seqs


def test_fit_recovers_known_coefficients():
    rng = random.Random(0)
    model = StepLatencyModel()
    assert model.coefficients == model.prior  # nothing observed yet
    for _ in range(400):
        tokens, seqs = rng.randint(1, 512), rng.randint(1, 64)
        model.observe(tokens, seqs, _step_time(tokens, seqs) * rng.uniform(0.98, 1.02))
    for got, want in zip(model.coefficients, TRUE, strict=True):
        assert got == pytest.approx(want, rel=0.05)
    assert model.predict(256, 32) == pytest.approx(_step_time(256, 32), rel=0.01)


def test_fit_is_sane_with_few_or_degenerate_samples():
    one = StepLatencyModel()
    one.observe(100, 4, 0.05)
    prior = StepLatencyModel().predict(100, 4)
    assert min(prior, 0.05) < one.predict(100, 4) < max(prior, 0.05)  # between prior and data
    flat = StepLatencyModel()  # every step has 8 sequences: a and c cannot be told apart
    for tokens in range(8, 500, 7):
        flat.observe(tokens, 8, _step_time(tokens, 8))
    assert flat.predict(300, 8) == pytest.approx(_step_time(300, 8), rel=0.02)
    flat.observe(0, 0, 1.0)  # an empty step teaches nothing
    assert flat.predict(300, 8) == pytest.approx(_step_time(300, 8), rel=0.02)
    with pytest.raises(ValueError, match="seconds"):
        flat.observe(10, 1, -1.0)


def _trained() -> CompletionEstimator:
    estimator = CompletionEstimator()
    rng = random.Random(1)
    for _ in range(200):
        tokens, seqs = rng.randint(1, 256), rng.randint(1, 8)
        estimator.observe(tokens, seqs, _step_time(tokens, seqs))
    return estimator


def _finish_times(scheduler, runner, requests) -> dict[str, float]:
    """Run with the synthetic clock until all of `requests` finish; their finish times."""
    clock, done = 0.0, {}
    while len(done) < len(requests):
        out = step(scheduler, runner)
        clock += _step_time(out.total_num_scheduled_tokens, len(out.num_scheduled_tokens))
        for r in requests:
            if r.status.finished and r.request_id not in done:
                done[r.request_id] = clock
    return done


def test_estimate_grows_with_queue_position_and_matches_simulation():
    scheduler, runner = make_scheduler(budget=128, max_seqs=4, policy="fcfs"), FakeRunner()
    rng = random.Random(2)
    reqs = [make_request(rng.randint(20, 300), max_tokens=rng.randint(5, 40)) for _ in range(13)]
    front, back = make_request(100, max_tokens=20), make_request(100, max_tokens=20)  # same shape
    reqs = reqs[:4] + [front] + reqs[4:] + [back]
    for r in reqs[:4]:
        scheduler.add_request(r)
    for _ in range(3):
        step(scheduler, runner)
    for r in reqs[4:]:
        scheduler.add_request(r)
    assert scheduler.policy.waiting_order()[0] is front and scheduler.policy.waiting_order()[-1] is back
    estimator = _trained()
    estimates = {r.request_id: estimator.estimate_finish(r, scheduler) for r in reqs}
    assert estimates[front.request_id] * 2 < estimates[back.request_id]
    # One simulation for all of them gives what one per request gives.
    assert estimator.estimate_finishes(reqs, scheduler) == [estimates[r.request_id] for r in reqs]
    actual = _finish_times(scheduler, runner, reqs)
    # Nothing arrives and memory is ample, so only the latency fit separates estimate and outcome.
    for r in reqs:
        assert estimates[r.request_id] == pytest.approx(actual[r.request_id], rel=0.05)


def test_estimate_follows_the_policy_order():
    # Under VTC the light client's request overtakes the heavy client's queue; FCFS order would
    # put it last. The estimate must follow the policy.
    scheduler, runner = make_scheduler(budget=256, max_seqs=2, policy="vtc"), FakeRunner()
    heavy = [make_request(64, max_tokens=30, client="heavy") for _ in range(8)]
    light = make_request(64, max_tokens=30, client="light")
    for r in heavy + [light]:
        scheduler.add_request(r)
    estimator = _trained()
    estimate = estimator.estimate_finish(light, scheduler)
    last_heavy = estimator.estimate_finish(heavy[-1], scheduler)
    actual = _finish_times(scheduler, runner, heavy + [light])
    assert estimate == pytest.approx(actual[light.request_id], rel=0.05)
    assert last_heavy == pytest.approx(actual[heavy[-1].request_id], rel=0.05)
    assert actual[light.request_id] < actual[heavy[-1].request_id] / 2


def test_estimate_work_is_bounded():
    scheduler = make_scheduler(budget=64, max_seqs=2)
    reqs = [make_request(200, max_tokens=2000) for _ in range(50)]
    for r in reqs:
        scheduler.add_request(r)
    estimator = CompletionEstimator(max_steps=100)
    eta = estimator.estimate_finish(reqs[-1], scheduler)
    full = CompletionEstimator().estimate_finish(reqs[-1], scheduler)
    assert 0 < eta < full  # cut short and extrapolated, not simulated to the end
