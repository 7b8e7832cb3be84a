"""The step-latency cost model: the time of any batch the scheduler can form, fitted from a profile.

A step computes slices (context tokens already cached, new tokens). Its time is modelled as

    t = k0 + k1 * tokens + k2 * sequences + k3 * prefill_attention + k4 * decode_attention
          + k5 * multi_row

- tokens: new tokens in the batch (the linear layers' rows),
- sequences: slices in the batch (one LM-head row and one sampler row each, per-sequence overhead),
- prefill_attention: sum over chunks of new * (context + new / 2) (query-key pairs of a causal chunk),
- decode_attention: sum over decodes of context + 1 (cached rows read once per decode),
- multi_row: 1 when the step has more than one new token. A one-row step's matrix products are
  matrix-vector products, a different kernel (MKL's fp32 GEMV against a GEMM; figures below).

The coefficients are non-negative and fitted by least squares on relative error (every point counts
alike whether it takes 2 ms or 2 s), so the model is as good on small decode steps as on long prefills.
That linear form is the simple model the scheduler tests price steps with. A measured profile gets
TokenCurveCostModel: the same attention and per-sequence terms, but the rest (the linear layers, the
constant) is a piecewise-linear curve through the profiled token counts, since on a CPU that cost is
not linear in rows: the BLAS library picks kernels by shape (default model, one thread: one decode
73 ms, two 105 ms, four 95 ms, eight 116 ms). A line through those points misprices the small
batches the server forms all the time.

Pure Python plus numpy: the simulator uses it with no torch.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
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


class _ProfileErrors:
    """What both fitted models report of the profile they were fitted to."""

    def step_seconds(self, slices: Iterable[tuple[int, int]]) -> float:
        raise NotImplementedError

    def relative_errors(self, profile: Profile) -> list[float]:
        """|predicted - measured| / measured at every point of a profile."""
        batches, seconds = profile_batches(profile)
        return [abs(self.step_seconds(b) - s) / s for b, s in zip(batches, seconds, strict=True)]


@dataclass(frozen=True)
class CostModel(_ProfileErrors):
    coefficients: tuple[float, ...]  # one per FEATURES entry, seconds per unit

    def step_seconds(self, slices: Iterable[tuple[int, int]]) -> float:
        return float(np.dot(self.coefficients, features(slices)))

    @classmethod
    def fit(cls, profile: Profile) -> CostModel:
        batches, seconds = profile_batches(profile)
        if len(batches) < len(FEATURES):
            raise ValueError(f"a profile needs at least {len(FEATURES)} points, got {len(batches)}")
        return cls(tuple(fit_relative([features(b) for b in batches], seconds)))

    def scaled(self, factor: float) -> CostModel:
        """Every step `factor` times as long (a profile's serving factor: sutra/sim/calibrate.py)."""
        return CostModel(tuple(c * factor for c in self.coefficients))

    def describe(self) -> str:
        return ", ".join(f"{n}={c:.3g}" for n, c in zip(FEATURES, self.coefficients, strict=True))


def fit_relative(rows: Sequence[Sequence[float]], seconds: Sequence[float]) -> list[float]:
    """Non-negative coefficients fitted by least squares on relative error (every point counts alike
    whether it takes 2 ms or 2 s): features whose coefficient comes out negative are dropped and the
    rest fitted again (a small active-set loop)."""
    x = np.array(rows, dtype=float)
    y = np.array(seconds, dtype=float)
    if not (np.isfinite(y).all() and (y > 0).all()):
        raise ValueError("profile times must be finite and positive")
    relative, target = x / y[:, None], np.ones_like(y)
    active = [i for i in range(x.shape[1]) if x[:, i].any()]
    while True:
        coef, *_ = np.linalg.lstsq(relative[:, active], target, rcond=None)
        if (coef >= 0).all() or len(active) == 1:
            break
        active = [i for i, c in zip(active, coef, strict=True) if c > 0] or active[:1]
    full = [0.0] * x.shape[1]
    for i, c in zip(active, coef, strict=True):
        full[i] = max(0.0, float(c))
    return full


def knot_weights(knots: Sequence[int], tokens: float) -> list[float]:
    """Each knot's weight in the piecewise-linear interpolation at `tokens`: flat before the first
    knot, the last segment's line past the last one."""
    weights = [0.0] * len(knots)
    if len(knots) == 1 or tokens <= knots[0]:
        weights[0] = 1.0
        return weights
    i = min(bisect.bisect_right(knots, tokens), len(knots) - 1)
    low, high = knots[i - 1], knots[i]
    share = (tokens - low) / (high - low)
    weights[i - 1], weights[i] = 1.0 - share, share
    return weights


@dataclass(frozen=True)
class TokenCurveCostModel(_ProfileErrors):
    """t = f(tokens) + k_seq * sequences + k_pre * prefill_attention + k_dec * decode_attention, with
    f piecewise linear through its value at each knot (the token counts the profile measured) and the
    other terms as in CostModel."""

    knots: tuple[int, ...]
    coefficients: tuple[float, ...]  # f at each knot, then k_seq, k_pre, k_dec

    def features(self, slices: Iterable[tuple[int, int]]) -> list[float]:
        _, tokens, sequences, prefill, decode, _ = features(slices)
        return knot_weights(self.knots, tokens) + [sequences, prefill, decode]

    def step_seconds(self, slices: Iterable[tuple[int, int]]) -> float:
        return max(0.0, float(np.dot(self.coefficients, self.features(slices))))

    @staticmethod
    def knots_of(profile: Profile) -> tuple[int, ...]:
        """The token counts a profile measured."""
        return tuple(sorted({p.chunk for p in profile.prefill} | {p.batch for p in profile.decode}))

    @classmethod
    def fit(cls, profile: Profile) -> TokenCurveCostModel:
        knots = cls.knots_of(profile)
        batches, seconds = profile_batches(profile)
        if len(batches) < len(knots) + 3:
            raise ValueError(f"a profile needs at least {len(knots) + 3} points, got {len(batches)}")
        unfitted = cls(knots, ())
        return cls(knots, tuple(fit_relative([unfitted.features(b) for b in batches], seconds)))

    def scaled(self, factor: float) -> TokenCurveCostModel:
        return TokenCurveCostModel(self.knots, tuple(c * factor for c in self.coefficients))

    def describe(self) -> str:
        n = len(self.knots)
        curve = ", ".join(
            f"{k}:{c * 1e3:.1f}ms" for k, c in zip(self.knots, self.coefficients[:n], strict=True)
        )
        seq, pre, dec = self.coefficients[n:]
        return f"tokens {{{curve}}}, sequences={seq:.3g}, prefill_attention={pre:.3g}, decode_attention={dec:.3g}"


def fit_cost_model(profile: Profile) -> TokenCurveCostModel | CostModel:
    """The fitted model of a measured profile: the token curve where the profile can tell its terms
    apart, else the linear model. The curve needs a token count measured both as a prefill chunk and
    as a decode batch (only there do the sequences differ at equal tokens, which is what separates
    the per-sequence cost from the curve) and enough points for its knots."""
    chunks = {p.chunk for p in profile.prefill}
    both_ways = chunks & {p.batch for p in profile.decode}
    points = len(profile.prefill) + len(profile.decode)
    if both_ways and points >= len(TokenCurveCostModel.knots_of(profile)) + 3:
        return TokenCurveCostModel.fit(profile)
    return CostModel.fit(profile)


def load_cost_model(profile: Profile) -> StepCost:
    """What prices the simulator's steps for a profile: a roofline-derived profile gives the roofline
    itself (its max() kinks, where a batch turns compute-bound, are what chunking trades on, and a
    linear fit would blur them); a measured one gives the cost model fitted to it, scaled by its
    serving factor."""
    if profile.roofline is not None:
        return RooflineCostModel.from_dict(profile.roofline)
    return fit_cost_model(profile).scaled(profile.serving_factor)
