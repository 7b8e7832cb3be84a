"""The arrival process: all at once, Poisson, or gamma gaps whose variance the burstiness sets."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sutra.bench.arrivals import arrival_offsets, inter_arrival_gaps

N = 40_000


def test_infinite_rate_sends_everything_at_once():
    assert inter_arrival_gaps(5, math.inf, 1.0, np.random.default_rng(0)) == [0.0] * 5
    assert arrival_offsets(5, math.inf, 0.3, np.random.default_rng(0)) == [0.0] * 5


def test_poisson_gaps_have_mean_one_over_rate_and_unit_cv():
    gaps = np.array(inter_arrival_gaps(N, 8.0, 1.0, np.random.default_rng(0)))
    assert gaps.mean() == pytest.approx(1 / 8, rel=0.03)
    assert gaps.var() == pytest.approx(1 / 64, rel=0.06)  # exponential: variance = mean^2
    assert (gaps > 0).all()


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_burstiness_keeps_the_mean_and_scales_the_variance(burstiness: float):
    rate = 8.0
    gaps = np.array(inter_arrival_gaps(N, rate, burstiness, np.random.default_rng(1)))
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.04)
    # gamma(shape k, scale 1/(rate k)): variance 1 / (k rate^2), i.e. squared CV = 1/k
    assert gaps.var() == pytest.approx(1 / (burstiness * rate**2), rel=0.1)


def test_burstier_means_more_variance():
    rng = np.random.default_rng
    bursty = np.var(inter_arrival_gaps(N, 2.0, 0.5, rng(2)))
    poisson = np.var(inter_arrival_gaps(N, 2.0, 1.0, rng(2)))
    even = np.var(inter_arrival_gaps(N, 2.0, 3.0, rng(2)))
    assert bursty > 1.5 * poisson > 1.5 * 1.5 * even


def test_infinite_burstiness_is_a_constant_rate():
    assert inter_arrival_gaps(3, 4.0, math.inf, np.random.default_rng(0)) == [0.25, 0.25, 0.25]


def test_offsets_are_the_running_sum_and_seeded():
    gaps = inter_arrival_gaps(100, 5.0, 1.0, np.random.default_rng(9))
    offsets = arrival_offsets(100, 5.0, 1.0, np.random.default_rng(9))
    assert offsets == pytest.approx(np.cumsum(gaps).tolist())
    assert offsets == sorted(offsets)
    assert arrival_offsets(100, 5.0, 1.0, np.random.default_rng(10)) != offsets


@pytest.mark.parametrize("rate, burstiness", [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.0), (math.nan, 1.0)])
def test_invalid_parameters_are_rejected(rate: float, burstiness: float):
    with pytest.raises(ValueError):
        inter_arrival_gaps(3, rate, burstiness, np.random.default_rng(0))
