"""logit_bias in SamplingParams (validation) and in the sampler (what it changes, and what it leaves)."""

from __future__ import annotations

import math

import pytest
import torch

from sutra.errors import InvalidRequestError
from sutra.model.sampling import Sampler, SamplingRequest, apply_logit_bias
from sutra.sampling_params import SamplingParams

VOCAB = 64


def req(**params) -> SamplingRequest:
    generator = torch.Generator().manual_seed(params["seed"]) if "seed" in params else None
    return SamplingRequest(SamplingParams(**params), [1, 2, 3], [4, 4], generator)


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


# ---- SamplingParams ------------------------------------------------------------------------------------


def test_keys_become_ints_and_an_empty_bias_is_none() -> None:
    assert SamplingParams(logit_bias={"5": 1, 7: -2.5, " 9": 100}).logit_bias == {5: 1.0, 7: -2.5, 9: 100.0}
    assert SamplingParams(logit_bias={}).logit_bias is None
    assert SamplingParams().logit_bias is None


@pytest.mark.parametrize(
    ("bias", "message"),
    [
        ({"abc": 1}, "keys must be token ids"),
        ({"1.5": 1}, "keys must be token ids"),
        ({True: 1}, "keys must be token ids"),
        ({"3": 100.5}, "in [-100, 100], got 100.5 for token 3"),
        ({"3": -101}, "in [-100, 100]"),
        ({"3": math.nan}, "in [-100, 100], got nan"),
        ({"3": math.inf}, "in [-100, 100]"),
        ({"3": "high"}, "in [-100, 100]"),
        ([1, 2], "must map token ids to numbers"),
    ],
)
def test_bad_bias_is_refused_naming_the_field(bias, message) -> None:
    with pytest.raises(InvalidRequestError, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
        SamplingParams(logit_bias=bias)
    assert e.value.param == "logit_bias"


def test_vocabulary_check_names_the_first_id_outside_it() -> None:
    params = SamplingParams(logit_bias={"3": 1, "64": 1, "-1": 1})
    SamplingParams(logit_bias={"63": 5}).check_vocabulary(VOCAB)
    with pytest.raises(InvalidRequestError, match=r"token id 64 is outside the vocabulary \[0, 64\)") as e:
        params.check_vocabulary(VOCAB)
    assert e.value.param == "logit_bias"


# ---- the sampler ---------------------------------------------------------------------------------------


def test_no_bias_costs_nothing_and_copies_nothing() -> None:
    raw = logits(4)
    assert apply_logit_bias(raw, [req(temperature=0.0) for _ in range(4)]) is raw


def test_plus_100_forces_a_token_and_minus_100_bans_the_greedy_one() -> None:
    raw = logits(3)
    greedy = raw.argmax(-1).tolist()
    forced = (greedy[0] + 1) % VOCAB
    out = Sampler()(
        raw,
        [
            req(temperature=0.0, logit_bias={forced: 100}),
            req(temperature=0.0, logit_bias={greedy[1]: -100}),
            req(temperature=1.0, seed=3, logit_bias={forced: 100}),  # sampled rows too
        ],
    )
    assert out.token_ids[0] == forced and out.token_ids[2] == forced
    second_best = raw[1].clone()
    second_best[greedy[1]] = -math.inf
    assert out.token_ids[1] == int(second_best.argmax())


def test_rows_without_a_bias_are_bit_identical() -> None:
    """Batch mates of biased rows: the same logits bits after the bias step, the same greedy tokens
    and the same seeded samples as in a batch where nobody has a bias."""
    raw = logits(6, seed=1)
    plain = [req(temperature=0.0), req(temperature=0.8, seed=5), req(temperature=0.7, top_p=0.9, seed=6)]
    biased = [req(temperature=0.0, logit_bias={i: 50.0 - i for i in range(0, VOCAB, 3)}) for _ in range(3)]
    mixed = [plain[0], biased[0], plain[1], biased[1], plain[2], biased[2]]
    after = apply_logit_bias(raw, mixed)
    assert torch.equal(after[[0, 2, 4]], raw[[0, 2, 4]])
    assert not torch.equal(after[[1, 3, 5]], raw[[1, 3, 5]])
    assert torch.equal(raw, logits(6, seed=1))  # the raw logits (which logprobs report) are untouched
    alone = Sampler()(raw[[0, 2, 4]].clone(), [req(temperature=0.0), *(req(**p) for p in SEEDED)])
    together = Sampler()(raw, mixed)
    assert [together.token_ids[i] for i in (0, 2, 4)] == alone.token_ids


SEEDED = [dict(temperature=0.8, seed=5), dict(temperature=0.7, top_p=0.9, seed=6)]


def test_bias_is_added_before_penalties_and_logprobs_stay_raw() -> None:
    """vLLM's order: the bias, then the penalties (a repetition penalty divides the biased logit)."""
    raw = torch.zeros(1, VOCAB)
    raw[0, 4] = 1.0
    params = dict(temperature=0.0, repetition_penalty=2.0, logprobs=0)
    out = Sampler()(raw, [req(**params, logit_bias={4: 3.0, 9: 2.5})])  # token 4 was generated
    # Bias, then penalty: token 4 -> (1 + 3) / 2 = 2.0 loses to the unseen token 9 at 2.5.
    # (Penalty, then bias would give token 4 1 / 2 + 3 = 3.5, and it would win.)
    assert out.token_ids == [9]
    assert out.logprobs[0].logprob == pytest.approx(float(torch.log_softmax(raw[0], -1)[9]))


def test_ids_past_the_logits_are_ignored_by_the_sampler() -> None:
    """The API layers refuse them; the sampler never indexes past its logits whatever it is given."""
    raw = logits(1)
    out = Sampler()(raw, [req(temperature=0.0, logit_bias={VOCAB + 5: 100})])
    assert out.token_ids == raw.argmax(-1).tolist()


def test_biased_rows_with_banned_tokens_still_ban_them() -> None:
    raw = logits(1)
    request = req(temperature=0.0, logit_bias={7: 100})
    request.banned_token_ids = (7,)
    out = Sampler()(raw, [request])
    assert out.token_ids[0] != 7 and not out.errors
