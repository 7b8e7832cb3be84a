"""The cost models recover known coefficients, stay non-negative, and predict a real profile of
this machine (the tiny random model); the token curve prices the kernel-shaped step costs a line
cannot, and a profile that cannot tell its terms apart gets the linear model."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from sutra.config import CacheConfig, EngineConfig, ModelConfig
from sutra.engine.engine import LLMEngine
from sutra.sim.cost_model import (
    FEATURES,
    CostModel,
    TokenCurveCostModel,
    features,
    fit_cost_model,
    knot_weights,
    load_cost_model,
)
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


# A CPU-like dense cost in ms by batch rows: one row is a matrix-vector product, two to three rows are
# slower than four (the BLAS library's kernels by shape), then roughly linear.
CURVE_MS = {
    1: 64.0,
    2: 103.0,
    3: 114.0,
    4: 100.0,
    8: 116.0,
    16: 140.0,
    32: 190.0,
    64: 280.0,
    128: 450.0,
    256: 900.0,
}
PER_SEQUENCE, PREFILL_ATTENTION, DECODE_ATTENTION = 9e-4, 1.6e-6, 1.2e-5


def curve_truth(slices: list[tuple[int, int]]) -> float:
    tokens = sum(new for _, new in slices)
    knots = sorted(CURVE_MS)
    dense = sum(w * CURVE_MS[k] / 1e3 for w, k in zip(knot_weights(knots, tokens), knots, strict=True))
    _, _, sequences, prefill, decode, _ = features(slices)
    return dense + PER_SEQUENCE * sequences + PREFILL_ATTENTION * prefill + DECODE_ATTENTION * decode


def curve_profile() -> Profile:
    profile = Profile("synthetic", "float32", "cpu", 1, 16, "test")
    for context in (0, 512, 2048):
        for chunk in (16, 32, 64, 128, 256):
            profile.prefill.append(PrefillPoint(chunk, context, curve_truth([(context, chunk)])))
        for batch in (1, 2, 3, 4, 8, 16, 32):
            profile.decode.append(DecodePoint(batch, context, curve_truth([(context, 1)] * batch)))
    return profile


def test_the_token_curve_prices_hybrid_batches_a_line_cannot():
    profile = curve_profile()
    model = fit_cost_model(profile)
    assert isinstance(model, TokenCurveCostModel) and model.knots == tuple(sorted(CURVE_MS))
    truth = [v / 1e3 for v in CURVE_MS.values()] + [PER_SEQUENCE, PREFILL_ATTENTION, DECODE_ATTENTION]
    assert model.coefficients == pytest.approx(truth, rel=1e-6)
    # Batches the profile never measured: chunks beside decodes (sarathi's hybrid steps), several
    # chunks at once, and a batch past the last knot (the last segment's line).
    held_out = [
        [(300, 1)] * 5 + [(0, 200)],
        [(40, 1), (900, 1), (1500, 1)],
        [(0, 100), (512, 60), (7, 1)],
        [(100, 1)] * 6,
        [(0, 300)],
    ]
    for slices in held_out:
        assert model.step_seconds(slices) == pytest.approx(curve_truth(slices), rel=1e-6)
    # The line misses the small decode batches the server forms all the time.
    line = CostModel.fit(profile)
    assert max(line.relative_errors(profile)) > 0.05
    assert max(model.relative_errors(profile)) < 1e-6
    assert model.describe().startswith("tokens {1:64.0ms, 2:103.0ms, 3:114.0ms, 4:100.0ms, 8:116.0ms")
    # The serving factor scales every term.
    scaled = load_cost_model(replace(profile, serving_factor=1.2))
    assert scaled.step_seconds(held_out[0]) == pytest.approx(1.2 * curve_truth(held_out[0]), rel=1e-6)


def test_a_profile_that_cannot_separate_the_terms_gets_the_linear_model():
    # synthetic(): no token count measured both as a chunk and as a decode batch, so per-sequence
    # cost and the curve would be one unknown.
    assert isinstance(fit_cost_model(synthetic((2e-3, 5e-5, 1e-4, 3e-9, 2e-7, 4e-3))), CostModel)
    sparse = curve_profile()
    # 16 measured both ways, but 8 points for 7 knots and 3 other terms
    sparse.prefill, sparse.decode = sparse.prefill[:2], sparse.decode[:6]
    assert isinstance(fit_cost_model(sparse), CostModel)


def test_knot_weights_interpolate_and_extend_the_last_segment():
    assert knot_weights([1, 4, 8], 1) == [1.0, 0.0, 0.0]
    assert knot_weights([1, 4, 8], 0) == [1.0, 0.0, 0.0]  # flat before the first knot
    assert knot_weights([1, 4, 8], 6) == pytest.approx([0.0, 0.5, 0.5])
    assert knot_weights([1, 4, 8], 8) == pytest.approx([0.0, 0.0, 1.0])
    assert knot_weights([1, 4, 8], 12) == pytest.approx([0.0, -1.0, 2.0])  # the 4-8 line, continued


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
    # benchmarks/sim_validation.py. Here: the fits of a measured profile are usable models (32 tokens
    # measured both ways, so the curve is fitted).
    line = CostModel.fit(profile)
    assert all(c >= 0 for c in line.coefficients) and line.coefficients[0] + line.coefficients[1] > 0
    curve = fit_cost_model(profile)
    assert isinstance(curve, TokenCurveCostModel) and curve.knots == (1, 8, 32, 128, 384)
    assert all(c >= 0 for c in curve.coefficients) and all(c > 0 for c in curve.coefficients[:5])
    for model in (line, curve):
        assert all(math.isfinite(e) for e in model.relative_errors(profile))
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks and not engine.runner.requests
    with pytest.raises(ValueError, match="at least one timed run"):
        profile_engine(engine, chunks=[32], contexts=[0], batches=[1], reps=0)
