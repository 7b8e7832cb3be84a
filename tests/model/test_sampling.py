from __future__ import annotations

import math

import pytest
import torch

from sutra.errors import InvalidRequestError, RequestFailedError
from sutra.model.sampling import (
    Sampler,
    SamplingRequest,
    apply_penalties,
    inverse_cdf_sample,
    top_k_top_p_window,
)
from sutra.sampling_params import SamplingParams


def req(
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    generator: torch.Generator | None = None,
    **params,
) -> SamplingRequest:
    if "seed" in params and generator is None:
        generator = torch.Generator().manual_seed(params["seed"])
    return SamplingRequest(SamplingParams(**params), prompt or [], output or [], generator)


def log_probs(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs).log()


def draw_set(logits_row: torch.Tensor, draws: int = 3000, **params) -> set[int]:
    """Tokens seen over many draws, taken as one batch of identical rows."""
    torch.manual_seed(0)
    out = Sampler()(logits_row.expand(draws, -1).contiguous(), [req(**params) for _ in range(draws)])
    return set(out.token_ids)


# ---- greedy --------------------------------------------------------------------------------------------


def test_greedy_is_argmax() -> None:
    logits = torch.randn(16, 100, generator=torch.Generator().manual_seed(1))
    out = Sampler()(logits, [req(temperature=0.0) for _ in range(16)])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 16


def test_greedy_ties_pick_lowest_id_and_top_k_one_is_greedy() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0], [5.0, 1.0, 5.0, 0.0]])
    out = Sampler()(logits, [req(temperature=0.0), req(temperature=1.0, top_k=1)])
    assert out.token_ids == [1, 0]


# ---- penalties -----------------------------------------------------------------------------------------


def test_banned_tokens_are_never_chosen_but_logprobs_keep_the_raw_distribution() -> None:
    logits = log_probs([0.1, 0.6, 0.3]).expand(2, -1).contiguous()
    banned = SamplingRequest(SamplingParams(temperature=0.0, logprobs=1), [], [], None, banned_token_ids=(1,))
    free = req(temperature=0.0, logprobs=1)
    out = Sampler()(logits, [banned, free])
    assert out.token_ids == [2, 1]
    assert out.logprobs[0].logprob == pytest.approx(math.log(0.3), abs=1e-5)
    assert out.logprobs[0].top[0][0] == 1  # the banned token is still the raw top-1
    sampled = Sampler()(
        logits,
        [
            SamplingRequest(SamplingParams(seed=s), [], [], torch.Generator().manual_seed(s), (1, 2))
            for s in (1, 2)
        ],
    )
    assert sampled.token_ids == [0, 0]


def test_repetition_penalty_divides_positive_multiplies_negative() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, -1.0]])
    got = apply_penalties(logits, [req(prompt=[0], output=[1, 1], repetition_penalty=2.0)])
    assert torch.equal(got, torch.tensor([[1.0, -4.0, 1.0, 0.5, -1.0]]))
    assert torch.equal(logits, torch.tensor([[2.0, -2.0, 1.0, 0.5, -1.0]]))  # input untouched


def test_presence_and_frequency_use_output_tokens_only() -> None:
    logits = torch.zeros(1, 5)
    r = req(prompt=[4, 4], output=[0, 0, 0, 2], presence_penalty=0.5, frequency_penalty=0.25)
    got = apply_penalties(logits, [r])
    assert torch.allclose(got, torch.tensor([[-(0.5 + 3 * 0.25), 0.0, -(0.5 + 0.25), 0.0, 0.0]]))


def test_penalties_per_row_and_in_order() -> None:
    logits = torch.tensor([[3.0, 1.0, -1.0], [3.0, 1.0, -1.0], [3.0, 1.0, -1.0]])
    rows = [
        req(output=[0, 2], repetition_penalty=1.5, frequency_penalty=1.0),
        req(output=[0, 2]),  # no penalties: unchanged
        req(prompt=[1], output=[2], presence_penalty=-1.0),
    ]
    got = apply_penalties(logits, rows)
    # Repetition first (3/1.5, -1*1.5), then frequency on the output counts.
    expected = torch.tensor([[2.0 - 1.0, 1.0, -1.5 - 1.0], [3.0, 1.0, -1.0], [3.0, 1.0, 0.0]])
    assert torch.allclose(got, expected)


def test_penalties_apply_under_greedy() -> None:
    logits = torch.tensor([[2.0, 1.5, 0.0]])
    out = Sampler()(logits, [req(output=[0], temperature=0.0, repetition_penalty=2.0)])
    assert out.token_ids == [1]


def test_penalties_ignore_ids_outside_vocab_and_count_repeats() -> None:
    logits = torch.ones(2, 4)
    rows = [
        req(prompt=[9, 1], output=[0, 0, 7, 2, 2, 2], repetition_penalty=2.0, frequency_penalty=0.5),
        req(output=[-1, 3], presence_penalty=1.0),
    ]
    got = apply_penalties(logits, rows)
    expected = torch.tensor([[0.5 - 1.0, 0.5, 0.5 - 1.5, 1.0], [1.0, 1.0, 1.0, 0.0]])
    assert torch.allclose(got, expected)


# ---- filters -------------------------------------------------------------------------------------------


def test_top_k_never_samples_outside_k_best() -> None:
    logits = torch.tensor([0.5, 2.0, 1.0, 1.9, 0.0, 1.95])
    assert draw_set(logits, top_k=3) == {1, 3, 5}


def test_top_p_keeps_smallest_prefix_reaching_p() -> None:
    logits = log_probs([0.15, 0.5, 0.05, 0.3])
    assert draw_set(logits, top_p=0.75) == {1, 3}
    assert draw_set(logits, top_p=0.85) == {0, 1, 3}
    assert draw_set(logits, top_p=0.1) == {1}


def test_top_p_applies_to_top_k_renormalized_mass() -> None:
    logits = log_probs([0.4, 0.3, 0.2, 0.1])
    # After top-k 2 the masses are 4/7 and 3/7: p=0.5 keeps only the first (0.4 alone would not).
    assert draw_set(logits, top_k=2, top_p=0.5) == {0}
    assert draw_set(logits, top_p=0.5) == {0, 1}


def test_min_p_is_relative_to_max_probability() -> None:
    logits = log_probs([0.15, 0.5, 0.05, 0.3])
    assert draw_set(logits, min_p=0.35) == {1, 3}
    assert draw_set(logits, min_p=0.0) == {0, 1, 2, 3}


def test_filters_compose_with_temperature() -> None:
    logits = log_probs([0.15, 0.5, 0.05, 0.3])
    # temperature 0.5 squares the odds: 0.25 / 0.09 / 0.0225 / 0.0025 normalised -> top-p 0.7 keeps 2.
    assert draw_set(logits, temperature=0.5, top_p=0.7) == {1, 3}


def reference_kept(row: torch.Tensor, k: int, p: float) -> set[int]:
    """Top-k then top-p by a plain full sort in float64, ties at a cut kept."""
    row = row.double()
    if k > 0:
        row = row.masked_fill(row < row.sort(descending=True).values[k - 1], float("-inf"))
    probs = torch.softmax(row, -1)
    vals, ids = probs.sort(descending=True)
    before = vals.cumsum(-1) - vals
    cut = vals[int((before < p - 1e-9).sum()) - 1]
    return set(torch.nonzero(probs >= cut).flatten().tolist())


@pytest.mark.parametrize("scale", [3.0, 0.3])  # 0.3: flat rows whose top-p sets outgrow the first window
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_window_cuts_match_full_sort_reference_with_ties(scale: float, temperature: float) -> None:
    # bf16 rounding gives many exact ties, as real model logits have.
    logits = torch.randn(24, 3000, generator=torch.Generator().manual_seed(3)) * scale
    logits = logits.bfloat16().float()
    settings = [(k, p) for k in (0, 1, 7, 50, 1000) for p in (1.0, 0.9, 0.5, 0.05)][1:]
    rows = [settings[i % len(settings)] for i in range(24)]
    temps = torch.full((24, 1), temperature)
    vals, ids = top_k_top_p_window(logits, temps, [k for k, _ in rows], [p for _, p in rows])
    for i, (k, p) in enumerate(rows):
        kept = set(ids[i][vals[i] > float("-inf")].tolist())
        assert kept == reference_kept(logits[i] / temperature, k, p)


def test_tied_logits_at_top_k_cut_are_kept_together() -> None:
    logits = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0])
    assert draw_set(logits, top_k=2) == {1, 2, 3}


# ---- temperature ---------------------------------------------------------------------------------------


def test_tiny_temperature_behaves_like_argmax() -> None:
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(4))
    for t in (1e-3, 1e-12):
        out = Sampler()(logits, [req(temperature=t) for _ in range(64)])
        assert out.token_ids == logits.argmax(-1).tolist()


def chi_square(logits: torch.Tensor, expected_probs: torch.Tensor, draws: int = 40_000, **params) -> float:
    torch.manual_seed(1234)
    out = Sampler()(logits.expand(draws, -1).contiguous(), [req(**params)] * draws)
    observed = torch.bincount(torch.tensor(out.token_ids), minlength=logits.shape[0]).double()
    expected = expected_probs.double() * draws
    support = expected > 0
    assert observed[~support].sum() == 0
    return float(((observed[support] - expected[support]) ** 2 / expected[support]).sum())


LOGITS = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0, 0.2, -2.0])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_empirical_distribution_matches_softmax(temperature: float) -> None:
    expected = torch.softmax(LOGITS.double() / temperature, -1)
    assert chi_square(LOGITS, expected, temperature=temperature) < 40.0  # 7 dof: p < 1e-5 if correct


def test_empirical_distribution_after_top_k_is_renormalized_softmax() -> None:
    top4 = LOGITS.double().masked_fill(LOGITS < LOGITS.topk(4).values[-1], float("-inf"))
    expected = torch.softmax(top4 / 0.9, -1)
    assert chi_square(LOGITS, expected, temperature=0.9, top_k=4) < 30.0  # 3 dof


def test_inverse_cdf_handles_unnormalised_and_zero_mass() -> None:
    probs = torch.tensor([[0.0, 2.0, 0.0, 2.0, 0.0]] * 3)
    u = torch.tensor([0.0, 0.4999, 0.9999999])
    assert inverse_cdf_sample(probs, u).tolist() == [1, 1, 3]


# ---- seeds ---------------------------------------------------------------------------------------------

STEPS = 6


def run_steps(logits: torch.Tensor, make_rows, target: int) -> list[int]:
    """Tokens of row `target` over several steps, each row keeping its generator between steps."""
    rows = make_rows()
    sampler = Sampler()
    torch.manual_seed(99)
    return [sampler(logits, rows).token_ids[target] for _ in range(STEPS)]


def seeded_row() -> SamplingRequest:
    return req(seed=1234, temperature=0.9, top_p=0.95)


def neighbours() -> list[SamplingRequest]:
    return [
        req(seed=7, top_k=20),
        req(temperature=1.3),
        req(temperature=0.0),
        req(seed=8, min_p=0.05, logprobs=3),
        req(top_p=0.5, presence_penalty=1.0, output=[1, 2]),
        req(seed=9),
        req(temperature=0.6, top_k=10),
    ]


def test_seeded_row_is_independent_of_batch() -> None:
    vocab = 300
    row = torch.randn(vocab, generator=torch.Generator().manual_seed(5))
    others = torch.randn(7, vocab, generator=torch.Generator().manual_seed(6))

    alone = run_steps(row.unsqueeze(0), lambda: [seeded_row()], 0)
    batch = torch.cat([row.unsqueeze(0), others])
    first = run_steps(batch, lambda: [seeded_row(), *neighbours()], 0)
    order = [3, 0, 6, 2, 5, 1, 4]
    shuffled = torch.cat([others[order[:4]], row.unsqueeze(0), others[order[4:]]])
    middle = run_steps(
        shuffled,
        lambda: [*(neighbours()[i] for i in order[:4]), seeded_row(), *(neighbours()[i] for i in order[4:])],
        4,
    )
    assert alone == first == middle
    assert len(set(alone)) > 1  # really sampling, not collapsing to one token


def test_seeded_row_same_when_a_wide_neighbour_changes_the_draw_branch() -> None:
    row = torch.randn(1, 1000, generator=torch.Generator().manual_seed(11)) * 4
    alone = run_steps(row, lambda: [req(seed=5, top_p=0.9)], 0)  # few kept tokens: sorted ids
    batch = torch.cat([torch.zeros(1, 1000), row])  # a flat top-p 0.99 row: scatter to the vocab
    together = run_steps(batch, lambda: [req(seed=6, top_p=0.99), req(seed=5, top_p=0.9)], 1)
    assert alone == together
    assert len(set(alone)) > 1


def test_different_seeds_give_different_tokens() -> None:
    logits = torch.zeros(1, 1000)
    seqs = {tuple(run_steps(logits, lambda s=s: [req(seed=s)], 0)) for s in range(5)}
    assert len(seqs) == 5


def test_same_seed_repeats_across_samplers() -> None:
    logits = torch.randn(2, 500, generator=torch.Generator().manual_seed(8))

    def make() -> list[SamplingRequest]:
        return [req(seed=42, temperature=1.0), req(seed=43, temperature=0.5, top_k=50)]

    assert run_steps(logits, make, 0) == run_steps(logits, make, 0)
    assert run_steps(logits, make, 1) == run_steps(logits, make, 1)


# ---- logprobs ------------------------------------------------------------------------------------------


def test_logprobs_are_of_raw_logits_with_ranks_and_sorted_top() -> None:
    logits = torch.randn(4, 200, generator=torch.Generator().manual_seed(9)) * 3
    rows = [
        req(temperature=0.0, logprobs=5),
        req(temperature=2.0, top_k=50, logprobs=20, repetition_penalty=1.7, output=[3, 4]),
        req(temperature=1.0),
        req(temperature=0.5, logprobs=0),
    ]
    torch.manual_seed(0)
    out = Sampler()(logits, rows)
    expected = torch.log_softmax(logits, -1)
    assert out.logprobs[2] is None
    for i in (0, 1, 3):
        lp = out.logprobs[i]
        assert lp is not None and lp.token_id == out.token_ids[i]
        assert math.isclose(lp.logprob, float(expected[i, lp.token_id]), abs_tol=1e-6)
        assert lp.rank == int((expected[i] > expected[i, lp.token_id]).sum()) + 1
        n = rows[i].params.logprobs
        assert len(lp.top) == n
        assert [t for t, _ in lp.top] == (expected[i].topk(n).indices.tolist() if n else [])
        for token, value in lp.top:
            assert math.isclose(value, float(expected[i, token]), abs_tol=1e-6)
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
    assert out.logprobs[0].rank == 1


# ---- rows with nothing to sample -----------------------------------------------------------------------

# Each kind of neighbour row: greedy, a draw over the whole vocabulary, and a top-k/top-p window.
NEIGHBOUR_PARAMS = [
    dict(temperature=0.0, logprobs=2),
    dict(temperature=0.8, seed=11, logprobs=2),
    dict(temperature=0.7, top_p=0.9, top_k=20, seed=12),
    dict(temperature=1.0, min_p=0.05, seed=13),
]


def _neighbours() -> list[SamplingRequest]:
    return [req(**p) for p in NEIGHBOUR_PARAMS]


@pytest.mark.parametrize("bad_params", [dict(temperature=0.0), dict(temperature=1.0), dict(top_p=0.5)])
def test_row_with_every_token_banned_fails_alone(bad_params: dict) -> None:
    """stop_token_ids covering the vocabulary, held off by min_tokens: that row has no token left. It
    fails with an error naming the field; the other rows sample exactly as without it."""
    vocab = 200
    logits = torch.randn(len(NEIGHBOUR_PARAMS) + 1, vocab, generator=torch.Generator().manual_seed(21))
    banned = SamplingRequest(
        SamplingParams(min_tokens=1, stop_token_ids=list(range(vocab)), **bad_params),
        [],
        [],
        banned_token_ids=tuple(range(vocab)),
    )
    out = Sampler()(logits, [*_neighbours()[:2], banned, *_neighbours()[2:]])
    alone = Sampler()(torch.cat([logits[:2], logits[3:]]), _neighbours())
    assert out.token_ids[2] == -1 and out.logprobs[2] is None
    assert list(out.errors) == [2]
    error = out.errors[2]
    assert isinstance(error, InvalidRequestError) and error.param == "stop_token_ids"
    assert "min_tokens=1" in str(error) and "whole vocabulary" in str(error)
    assert out.token_ids[:2] + out.token_ids[3:] == alone.token_ids
    assert all(0 <= t < vocab for t in alone.token_ids)
    assert out.logprobs[:2] + out.logprobs[3:] == alone.logprobs


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
@pytest.mark.parametrize("bad_params", [dict(temperature=0.0), dict(temperature=1.0), dict(top_k=5)])
def test_row_with_non_finite_logits_fails_alone(poison: float, bad_params: dict) -> None:
    vocab = 200
    logits = torch.randn(len(NEIGHBOUR_PARAMS) + 1, vocab, generator=torch.Generator().manual_seed(22))
    clean = logits[1:].clone()
    logits[0, 17] = poison
    out = Sampler()(logits, [req(**bad_params), *_neighbours()])
    alone = Sampler()(clean, _neighbours())
    assert out.token_ids[0] == -1 and list(out.errors) == [0]
    assert isinstance(out.errors[0], RequestFailedError)
    assert "non-finite logits" in str(out.errors[0])
    assert out.token_ids[1:] == alone.token_ids


def test_every_row_failing_still_returns() -> None:
    out = Sampler()(torch.full((3, 50), float("nan")), [req(temperature=t) for t in (0.0, 1.0, 0.5)])
    assert out.token_ids == [-1, -1, -1] and sorted(out.errors) == [0, 1, 2]


def test_top_k_and_logprobs_beyond_the_vocabulary() -> None:
    """top_k past the vocabulary is no cut; 20 logprobs of a 10-token vocabulary are all 10."""
    vocab = 10
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(23))
    rows = [req(top_k=vocab + 1, seed=1, logprobs=20), req(top_k=10**30, seed=1), req(seed=1)]
    out = Sampler()(logits, rows)
    assert out.token_ids[1] == Sampler()(logits[1:2], [req(seed=1)]).token_ids[0]
    assert len(out.logprobs[0].top) == vocab
    assert not out.errors


# ---- batch shape ---------------------------------------------------------------------------------------


def test_mixed_batch_keeps_greedy_rows_greedy() -> None:
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(10))
    rows = [req(temperature=0.0) if i % 2 else req(temperature=1.0, top_k=3) for i in range(6)]
    out = Sampler()(logits, rows)
    for i, token in enumerate(out.token_ids):
        if i % 2:
            assert token == int(logits[i].argmax())
        else:
            assert token in logits[i].topk(3).indices.tolist()


def test_rejects_mismatched_batch() -> None:
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(2, 5), [req()])


# ---- batch independence of the top-k / top-p cut -------------------------------------------------------


def knife_edge_top_ps(row: torch.Tensor, k: int, temperature: float, n: int = 4) -> list[float]:
    """top_p on and a few float32 steps either side of the row's first `n` cumulative masses (over its
    top-k tokens, or the whole row when k is 0): where a rounding difference in the normalising total
    moves the cut by one token."""
    scaled = (row.topk(k).values if k else row) / temperature
    masses = torch.softmax(scaled, -1).sort(descending=True).values.cumsum(-1)[:n]
    ps = []
    for mass in masses[masses < 1.0]:
        lo = hi = mass
        ps.append(float(mass))
        for _ in range(3):
            lo, hi = lo.nextafter(torch.tensor(0.0)), hi.nextafter(torch.tensor(1.0))
            ps += [float(lo), float(hi)]
    return [p for p in ps if 0.0 < p <= 1.0]


def assert_alone_equals_batched(logits: torch.Tensor, rows: list[dict], mates: list[dict]) -> None:
    """Each row sampled alone gives the same token and logprobs, bit for bit, as inside one batch with
    all the other rows and the `mates` (each mate on its own random logits)."""
    mate_logits = torch.randn(len(mates), logits.shape[1], generator=torch.Generator().manual_seed(31)) * 3
    torch.manual_seed(0)
    batched = Sampler()(
        torch.cat([logits, mate_logits]), [req(**p) for p in rows] + [req(**p) for p in mates]
    )
    assert not batched.errors
    sampled = set()
    for i, params in enumerate(rows):
        alone = Sampler()(logits[i : i + 1], [req(**params)])
        assert (alone.token_ids[0], alone.logprobs[0]) == (batched.token_ids[i], batched.logprobs[i]), params
        sampled.add(alone.token_ids[0])
    assert len(sampled) > 1


@pytest.mark.parametrize(
    "mates",
    [
        [dict(top_k=50, top_p=0.95, temperature=1.3, seed=3), dict(temperature=0.0)],  # a wider window
        [dict(top_p=0.8, seed=4), dict(top_k=0, temperature=0.7, logprobs=3)],  # top-p over whole rows
    ],
)
def test_top_k_top_p_row_does_not_depend_on_batch_mates(mates: list[dict]) -> None:
    """top_k 5 with top_p right at the edge of the row's own nucleus: the cut, the draw and the logprobs
    come from the row alone, not from the window the batch's widest row needs."""
    logits = torch.randn(64, 400, generator=torch.Generator().manual_seed(30)) * 2
    rows, row_ids = [], []
    for i in range(logits.shape[0]):
        temperature = (0.7, 1.0, 1.3)[i % 3]
        for p in knife_edge_top_ps(logits[i], 5, temperature):
            rows.append(dict(top_k=5, top_p=p, temperature=temperature, seed=len(rows), logprobs=2))
            row_ids.append(i)
    assert_alone_equals_batched(logits[row_ids], rows, mates)


def test_top_p_row_does_not_depend_on_batch_mates() -> None:
    """Top-p alone normalises by the whole row. Over a large vocabulary a plain sum over a lone row can
    be split across threads and round differently than in a batch; the row's total must not move."""
    gen = torch.Generator().manual_seed(32)
    rows_n, vocab = 32, 40_000
    # A few likely tokens over a long tail, so the nucleus edges sit at masses of a few tenths.
    logits = torch.randn(rows_n, vocab, generator=gen) - 9
    likely = torch.randperm(vocab, generator=gen)[: 4 * rows_n].view(rows_n, 4)
    logits.scatter_(1, likely, torch.tensor([2.0, 1.4, 0.9, 0.3]) + torch.rand(rows_n, 4, generator=gen) / 5)
    rows, row_ids = [], []
    for i in range(rows_n):
        for p in knife_edge_top_ps(logits[i], 0, 1.0, n=3):
            rows.append(dict(top_p=p, seed=len(rows)))
            row_ids.append(i)
    assert_alone_equals_batched(logits[row_ids], rows, [dict(top_k=5, top_p=0.9, seed=5)])
