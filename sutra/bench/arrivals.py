"""When each request is sent: all at once, a Poisson process, or gamma-distributed gaps (vLLM's burstiness).

Gaps between requests are gamma-distributed with shape k = burstiness and scale 1 / (rate * k): the mean
gap is 1 / rate whatever k, and the variance is 1 / (k * rate^2). k = 1 is the exponential distribution
(a Poisson process); k < 1 sends requests in bursts, k > 1 more evenly. Unlike vLLM, the drawn gaps are
not rescaled to make the last request land exactly at num_prompts / rate.
"""

from __future__ import annotations

import math

import numpy as np


def inter_arrival_gaps(
    n: int, request_rate: float, burstiness: float, rng: np.random.Generator
) -> list[float]:
    """The wait before each of n requests, in seconds (the first request also waits one gap, as in vLLM)."""
    if request_rate <= 0 or math.isnan(request_rate):
        raise ValueError(f"request rate must be positive, got {request_rate}")
    if burstiness <= 0 or math.isnan(burstiness):
        raise ValueError(f"burstiness must be positive, got {burstiness}")
    if math.isinf(request_rate):
        return [0.0] * n
    if math.isinf(burstiness):
        return [1.0 / request_rate] * n
    scale = 1.0 / (request_rate * burstiness)
    return [float(x) for x in rng.gamma(shape=burstiness, scale=scale, size=n)]


def arrival_offsets(n: int, request_rate: float, burstiness: float, rng: np.random.Generator) -> list[float]:
    """Send time of each request in seconds from the start of the run (the running sum of the gaps)."""
    return [float(t) for t in np.cumsum(inter_arrival_gaps(n, request_rate, burstiness, rng))]


def describe_arrivals(request_rate: float, burstiness: float) -> str:
    if math.isinf(request_rate):
        return "all requests at once"
    process = "Poisson process" if burstiness == 1.0 else "gamma distribution"
    return f"{request_rate:g} req/s, burstiness {burstiness:g} ({process})"
