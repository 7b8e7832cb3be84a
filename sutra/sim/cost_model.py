"""The step-latency cost model: the time of any batch the scheduler can form, fitted from a profile.

A step computes slices (context tokens already cached, new tokens). Its time is modelled as

    t = k0 + k1 * tokens + k2 * sequences + k3 * prefill_attention + k4 * decode_attention
          + k5 * multi_row

- tokens: new tokens in the batch (the linear layers' rows),
- sequences: slices in the batch (one LM-head row and one sampler row each, per-sequence overhead),
- prefill_attention: sum over chunks of new * (context + new / 2) (query-key pairs of a causal chunk),
- decode_attention: sum over decodes of context + 1 (cached rows read once per decode),
- multi_row: 1 when the step has more than one new token. A one-row step's matrix products are
  matrix-vector products, a different kernel (on this CPU, MKL's fp32 GEMV against a GEMM: one
  decode costs 53 ms, two or three 73 ms, eight 71 ms for the default model).

The coefficients are non-negative and fitted by least squares on relative error (every point counts
alike whether it takes 2 ms or 2 s), so the model is as good on small decode steps as on long prefills.
Pure Python plus numpy: the simulator uses it with no torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from sutra.sim.executor import StepCost
from sutra.sim.profile import Profile
from sutra.sim.roofline import RooflineCostModel

FEATURES = ("constant", "tokens", "sequences", "prefill_attention", "decode_attention", "multi_row")


def features(slices: Iterable[tuple[int, int]]) -> list[float]:
    """The model's features of one batch of (context, new tokens) slices."""
    tokens = sequences = prefill = decode = 0.0
    for context, new in slices:
        tokens += new
        sequences += 1
        if new == 1:
            decode += context + 1
        else:
            prefill += new * (context + new / 2)
    return [1.0, tokens, sequences, prefill, decode, 1.0 if tokens > 1 else 0.0]


def profile_batches(profile: Profile) -> tuple[list[list[tuple[int, int]]], list[float]]:
    """Every measured point as a batch of slices, and its seconds."""
    batches = [[(p.context, p.chunk)] for p in profile.prefill] + [
        [(p.context, 1)] * p.batch for p in profile.decode
    ]
    seconds = [p.seconds for p in profile.prefill] + [p.seconds for p in profile.decode]
    return batches, seconds


@dataclass(frozen=True)
class CostModel:
    coefficients: tuple[float, ...]  # one per FEATURES entry, seconds per unit

    def step_seconds(self, slices: Iterable[tuple[int, int]]) -> float:
        return float(np.dot(self.coefficients, features(slices)))

    @classmethod
    def fit(cls, profile: Profile) -> CostModel:
        batches, seconds = profile_batches(profile)
        if len(batches) < len(FEATURES):
            raise ValueError(f"a profile needs at least {len(FEATURES)} points, got {len(batches)}")
        x = np.array([features(b) for b in batches])
        y = np.array(seconds)
        if not (np.isfinite(y).all() and (y > 0).all()):
            raise ValueError("profile times must be finite and positive")
        # Relative error: divide each row by its time. Non-negative: drop features whose fitted
        # coefficient comes out negative and fit again (a small active-set loop).
        rows, target = x / y[:, None], np.ones_like(y)
        active = [i for i in range(len(FEATURES)) if x[:, i].any()]
        while True:
            coef, *_ = np.linalg.lstsq(rows[:, active], target, rcond=None)
            if (coef >= 0).all() or len(active) == 1:
                break
            active = [i for i, c in zip(active, coef, strict=True) if c > 0] or active[:1]
        full = [0.0] * len(FEATURES)
        for i, c in zip(active, coef, strict=True):
            full[i] = max(0.0, float(c))
        return cls(tuple(full))

    def scaled(self, factor: float) -> CostModel:
        """Every step `factor` times as long (a profile's serving factor: sutra/sim/calibrate.py)."""
        return CostModel(tuple(c * factor for c in self.coefficients))

    def relative_errors(self, profile: Profile) -> list[float]:
        """|predicted - measured| / measured at every point of a profile."""
        batches, seconds = profile_batches(profile)
        return [abs(self.step_seconds(b) - s) / s for b, s in zip(batches, seconds, strict=True)]


def load_cost_model(profile: Profile) -> StepCost:
    """What prices the simulator's steps for a profile: a roofline-derived profile gives the roofline
    itself (its max() kinks, where a batch turns compute-bound, are what chunking trades on, and a
    linear fit would blur them); a measured one gives the cost model fitted to it."""
    if profile.roofline is not None:
        return RooflineCostModel.from_dict(profile.roofline)
    return CostModel.fit(profile).scaled(profile.serving_factor)
