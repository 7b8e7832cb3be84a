"""Structured-output token masks in the sampler: a masked row samples only allowed tokens (greedy,
sampled, top-k/top-p, against a +100 bias), its logprobs stay the model's raw ones, rows without a
mask get the exact tokens and logprobs of a batch without masks, and a row left with nothing to
sample fails alone with a reason."""

from __future__ import annotations

import torch

from sutra.errors import InvalidRequestError, RequestFailedError
from sutra.model.sampling import Sampler, SamplingRequest, apply_token_masks
from sutra.sampling_params import SamplingParams
from sutra.structured import bitmask

VOCAB = 300


def mask_of(allowed: list[int]) -> torch.Tensor:
    mask = bitmask.allocate(1, VOCAB)
    bitmask.allow_only(mask, 0, allowed)
    return mask[0]


def req(allowed: list[int] | None = None, seed: int | None = None, **params) -> SamplingRequest:
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return SamplingRequest(
        SamplingParams(seed=seed, **params),
        [1, 2],
        [],
        generator,
        allowed_tokens=None if allowed is None else mask_of(allowed),
    )


def test_a_masked_row_samples_only_allowed_tokens():
    logits = torch.randn(64, VOCAB, generator=torch.Generator().manual_seed(0))
    allowed = [3, 77, 150, 299]
    variants = [
        dict(temperature=0.0),
        dict(temperature=1.0),
        dict(temperature=1.5, top_k=5),
        dict(temperature=1.0, top_p=0.5, min_p=0.1),
        dict(temperature=0.0, logit_bias={10: 100.0}),  # a bias cannot bring back a masked token
        dict(temperature=1.0, repetition_penalty=1.5, frequency_penalty=1.0),
    ]
    for params in variants:
        out = Sampler()(logits, [req(allowed, seed=i, **params) for i in range(64)])
        assert set(out.token_ids) <= set(allowed), params
    sampled = Sampler()(logits, [req(allowed, seed=i, temperature=1.0) for i in range(64)])
    assert len(set(sampled.token_ids)) > 1  # a real draw among the allowed, not a fixed pick


def test_logprobs_of_a_masked_row_are_the_raw_distribution():
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(1))
    out = Sampler()(logits, [req([42, 43], temperature=0.0, logprobs=2)])
    raw = torch.log_softmax(logits[0], dim=-1)
    lp = out.logprobs[0]
    assert lp is not None and lp.token_id in (42, 43)
    assert abs(lp.logprob - raw[lp.token_id].item()) < 1e-6
    assert [t for t, _ in lp.top] == raw.topk(2).indices.tolist()  # the model's own top tokens


def test_unmasked_rows_are_bit_identical_to_a_batch_without_masks():
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(2))
    kinds = [dict(temperature=0.0), dict(temperature=0.9), dict(temperature=0.8, top_p=0.9, top_k=40)]

    def batch(with_masks: bool) -> list[SamplingRequest]:
        rows = []
        for i in range(6):
            masked = with_masks and i % 2 == 1
            rows.append(req([5, 6] if masked else None, seed=100 + i, logprobs=3, **kinds[i % 3]))
        return rows

    plain, mixed = Sampler()(logits, batch(False)), Sampler()(logits, batch(True))
    for i in (0, 2, 4):
        assert mixed.token_ids[i] == plain.token_ids[i]
        assert mixed.logprobs[i] == plain.logprobs[i]
    for i in (1, 3, 5):
        assert mixed.token_ids[i] in (5, 6)


def test_no_mask_costs_nothing():
    logits = torch.randn(3, VOCAB)
    assert apply_token_masks(logits, [req(), req(), req()]) is logits


def test_a_row_with_nothing_to_sample_fails_alone_with_a_reason():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(3))
    eos = 2
    rows = [
        req([], temperature=0.0),  # the grammar allows nothing
        req(None, temperature=0.0),
        req([eos], temperature=1.0, min_tokens=4, max_tokens=8),  # complete, but the end is held off
    ]
    rows[2].banned_token_ids = (eos,)
    out = Sampler()(logits, rows)
    assert out.token_ids[0] == -1 and out.token_ids[2] == -1
    assert out.token_ids[1] == int(logits[1].argmax())
    assert isinstance(out.errors[0], RequestFailedError)
    assert "allows none" in str(out.errors[0])
    assert isinstance(out.errors[2], InvalidRequestError) and out.errors[2].param == "min_tokens"
