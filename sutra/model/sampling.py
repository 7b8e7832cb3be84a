"""Turn one engine step's logits into tokens.

Order per row: structured-output token mask -> logit bias -> penalties -> (greedy argmax | temperature
-> top-k -> top-p -> min-p -> sample), then logprobs of the raw logits for the rows that ask for them
(the model's own distribution, before the mask, the bias and the penalties: vLLM's raw logprobs).
Rows without a mask skip it at no cost, and keep their exact bits when batch mates have one.

Top-k/top-p rows are cut on a small window of their best tokens (one partial sort); a full-vocabulary
sort happens only when a cut spills past the windows tried (very flat rows). Cuts are by value, so
tied tokens stay or go together, and a row's masses come from its own tokens only: the wider window a
batch mate needs changes none of its bits. The draw is inverse-CDF in token-id order with one uniform
per row, from the row's own generator when it has one: a seeded row gives the same tokens whatever
batch it is in, and one uniform per row is far cheaper than a vocabulary of exponentials.

A row with nothing to sample (every token banned, or NaN / infinite logits) fails alone: its token is
-1 and SamplerOutput.errors says why; the other rows sample as if it were not there. Detecting it
costs a few ops per row, not per vocabulary entry."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import chain

import torch

from sutra.errors import InvalidRequestError, RequestFailedError, SutraError
from sutra.model.logprobs import TokenLogprobs, compute_logprobs
from sutra.sampling_params import SamplingParams
from sutra.structured import bitmask

# Dividing by a smaller temperature could overflow float32; this is already argmax in practice.
_MIN_TEMPERATURE = 1e-6
# First window for top-p: SmolLM2 rows at temperature 0.8 keep at most ~30 tokens for top_p 0.9;
# wider cuts retry with 16x the window, then the whole vocabulary.
_FIRST_WINDOW = 256


@dataclass
class SamplingRequest:
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None
    banned_token_ids: tuple[int, ...] = ()  # may not be sampled now (stop tokens before min_tokens)
    # Structured outputs: the tokens the request's grammar allows next, as an int32 bitmask row
    # (sutra.structured.bitmask); None for an unconstrained request.
    allowed_tokens: torch.Tensor | None = None


@dataclass
class SamplerOutput:
    token_ids: list[int]  # -1 for a row in `errors`
    logprobs: list[TokenLogprobs | None]
    errors: dict[int, SutraError] = field(default_factory=dict)  # row -> why nothing could be sampled


class Sampler:
    def __call__(self, logits: torch.Tensor, requests: list[SamplingRequest]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(requests):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(requests)} requests")
        raw = logits.float()
        biased = apply_logit_bias(apply_token_masks(raw, requests), requests)
        penalized = ban_tokens(apply_penalties(biased, requests, copy=biased is raw), requests, raw)
        tokens = self._choose(penalized, requests)
        token_ids = tokens.tolist()
        params = [r.params for r in requests]
        if -1 not in token_ids:
            return SamplerOutput(token_ids, compute_logprobs(raw, tokens, params))
        errors = {i: unsampleable_error(raw[i], requests[i]) for i, t in enumerate(token_ids) if t < 0}
        logprobs = compute_logprobs(raw, tokens.clamp(min=0), params)
        for i in errors:
            logprobs[i] = None
        return SamplerOutput(token_ids, logprobs, errors)

    def _choose(self, logits: torch.Tensor, requests: list[SamplingRequest]) -> torch.Tensor:
        sample_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
        if len(sample_rows) == len(requests):
            return self._sample(logits, requests)
        # The max is a NaN if the row has one, and -inf if every token is banned: such rows get -1.
        # Checked on the Python floats: cheaper than two more tensor ops when all is well.
        best, tokens = logits.max(dim=-1)
        if not all(map(math.isfinite, best.tolist())):
            tokens = torch.where(torch.isfinite(best), tokens, -1)
        if sample_rows:
            idx = torch.tensor(sample_rows, device=logits.device)
            tokens[idx] = self._sample(logits[idx], [requests[i] for i in sample_rows])
        return tokens

    def _sample(self, logits: torch.Tensor, requests: list[SamplingRequest]) -> torch.Tensor:
        params = [r.params for r in requests]
        u = row_uniforms(requests, logits.device)
        vocab = logits.shape[1]
        # A row's path depends on its own params only, so batch-mates never change its arithmetic.
        filtered = [i for i, p in enumerate(params) if p.top_p < 1.0 or 0 < p.top_k < vocab]
        if len(filtered) == len(params):
            return sample_filtered(logits, params, u)
        if not filtered:
            return sample_full(logits, params, u)
        in_filtered = set(filtered)
        rest = [i for i in range(len(params)) if i not in in_filtered]
        tokens = torch.empty(len(params), dtype=torch.long, device=logits.device)
        for rows, sample in ((filtered, sample_filtered), (rest, sample_full)):
            idx = torch.tensor(rows, device=logits.device)
            tokens[idx] = sample(logits[idx], [params[i] for i in rows], u[idx])
        return tokens


def sample_full(logits: torch.Tensor, params: list[SamplingParams], u: torch.Tensor) -> torch.Tensor:
    """Rows without top-k/top-p: temperature, min-p, then a draw over the whole vocabulary."""
    probs = torch.softmax(logits / _temperatures(params, logits), dim=-1)
    min_ps = [p.min_p for p in params]
    if any(mp > 0.0 for mp in min_ps):
        probs = probs.masked_fill(probs < _column(min_ps, probs) * probs.amax(dim=-1, keepdim=True), 0.0)
    return inverse_cdf_sample(probs, u)


def sample_filtered(logits: torch.Tensor, params: list[SamplingParams], u: torch.Tensor) -> torch.Tensor:
    """Rows with top-k/top-p: everything after the cut happens on a small window of candidates."""
    vals, ids = top_k_top_p_window(
        logits, _temperatures(params, logits), [p.top_k for p in params], [p.top_p for p in params]
    )
    weights = (vals - vals[:, :1]).exp()  # probability relative to the row's best token
    min_ps = [p.min_p for p in params]
    if any(mp > 0.0 for mp in min_ps):
        weights = weights.masked_fill(weights < _column(min_ps, weights), 0.0)
    # The draw runs in token-id order (zeros between kept tokens change no prefix sum), so it does not
    # depend on how the partial sort ordered ties, on the window's width, or on which branch runs.
    if ids.shape[1] * 8 > logits.shape[1]:  # wide cuts: scattering back is cheaper than sorting ids
        return inverse_cdf_sample(torch.zeros_like(logits).scatter_(1, ids, weights), u)
    order = ids.argsort(dim=-1)
    ids, weights = ids.gather(1, order), weights.gather(1, order)
    picked = inverse_cdf_sample(weights, u)
    return torch.where(picked >= 0, ids.gather(1, picked.clamp(min=0).unsqueeze(1)).squeeze(1), -1)


def _temperatures(params: list[SamplingParams], like: torch.Tensor) -> torch.Tensor:
    return _column([max(p.temperature, _MIN_TEMPERATURE) for p in params], like)


def _column(values: list[float] | list[int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)


# ---- structured outputs -------------------------------------------------------------------------------


def apply_token_masks(logits: torch.Tensor, requests: list[SamplingRequest]) -> torch.Tensor:
    """-inf for every token a constrained row's grammar does not allow next. Returns `logits` itself
    when no row is constrained, else a copy in which only the constrained rows changed."""
    rows = [i for i, r in enumerate(requests) if r.allowed_tokens is not None]
    if not rows:
        return logits
    masks = torch.stack([requests[i].allowed_tokens for i in rows]).to(logits.device)  # type: ignore[misc]
    add = bitmask.additive(masks, logits.shape[1], logits.dtype)
    logits = logits.clone()
    if len(rows) == len(requests):
        logits += add
    else:
        idx = torch.tensor(rows, device=logits.device)
        logits[idx] += add
    return logits


# ---- penalties ----------------------------------------------------------------------------------------


def apply_logit_bias(logits: torch.Tensor, requests: list[SamplingRequest]) -> torch.Tensor:
    """Adds each row's logit_bias (before penalties, as vLLM orders them). Returns `logits` itself when
    no row has a bias, else a copy in which only the biased (row, token) pairs changed: rows without a
    bias keep their exact bits."""
    rows = [i for i, r in enumerate(requests) if r.params.logit_bias]
    if not rows:
        return logits
    vocab = logits.shape[1]
    # Ids past the logits' vocabulary (the API layers refuse them) are dropped here, so that ids and
    # values stay aligned.
    biases = [
        {t: v for t, v in (requests[i].params.logit_bias or {}).items() if 0 <= t < vocab} for i in rows
    ]
    row_ids, ids = _token_pairs([list(b) for b in biases], rows, logits)
    values = torch.tensor([v for b in biases for v in b.values()], dtype=logits.dtype)
    logits = logits.clone()
    logits[row_ids, ids] += values.to(logits.device)  # a row's keys are distinct: no pair repeats
    return logits


def apply_penalties(
    logits: torch.Tensor, requests: list[SamplingRequest], *, copy: bool = True
) -> torch.Tensor:
    """Returns `logits` itself when no row has penalties, else a penalized copy (or, with copy=False,
    `logits` penalized in place). Only the (row, token) pairs that occur are touched: a dense
    [rows, vocab] pass per penalty would cost far more."""
    rep_rows = [i for i, r in enumerate(requests) if r.params.repetition_penalty != 1.0]
    pf_rows = [
        i
        for i, r in enumerate(requests)
        if r.params.presence_penalty != 0.0 or r.params.frequency_penalty != 0.0
    ]
    if not rep_rows and not pf_rows:
        return logits
    if copy:
        logits = logits.clone()
    if rep_rows:
        # Duplicate pairs write the same value, so they need no dedup.
        rows, ids = _token_pairs([requests[i].prompt_token_ids for i in rep_rows], rep_rows, logits)
        out_rows, out_ids = _token_pairs([requests[i].output_token_ids for i in rep_rows], rep_rows, logits)
        rows, ids = torch.cat([rows, out_rows]), torch.cat([ids, out_ids])
        penalty = _per_row([r.params.repetition_penalty for r in requests], logits)[rows]
        seen = logits[rows, ids]
        logits[rows, ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
    if pf_rows:
        rows, ids = _token_pairs([requests[i].output_token_ids for i in pf_rows], pf_rows, logits)
        vocab = logits.shape[1]
        pairs, counts = torch.unique(rows * vocab + ids, return_counts=True)
        rows, ids = pairs // vocab, pairs % vocab
        presence = _per_row([r.params.presence_penalty for r in requests], logits)[rows]
        frequency = _per_row([r.params.frequency_penalty for r in requests], logits)[rows]
        logits[rows, ids] -= presence + frequency * counts.to(logits.dtype)
    return logits


def ban_tokens(logits: torch.Tensor, requests: list[SamplingRequest], raw: torch.Tensor) -> torch.Tensor:
    """-inf for each row's banned tokens; a copy when `logits` is still the raw tensor, whose
    distribution logprobs report."""
    rows = [i for i, r in enumerate(requests) if r.banned_token_ids]
    if not rows:
        return logits
    if logits is raw:
        logits = logits.clone()
    row_ids, ids = _token_pairs([list(requests[i].banned_token_ids) for i in rows], rows, logits)
    logits[row_ids, ids] = float("-inf")
    return logits


def _token_pairs(
    token_lists: list[list[int]], rows: list[int], like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (batch row, token id) of every listed token, dropping ids past the logits' vocabulary
    (added tokens cannot be penalized)."""
    ids = torch.tensor(list(chain.from_iterable(token_lists)), dtype=torch.long)
    row_ids = torch.repeat_interleave(torch.tensor(rows), torch.tensor([len(t) for t in token_lists]))
    keep = (ids >= 0) & (ids < like.shape[1])
    return row_ids[keep].to(like.device), ids[keep].to(like.device)


def _per_row(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)


# ---- filters ------------------------------------------------------------------------------------------


def top_k_top_p_window(
    logits: torch.Tensor, temps: torch.Tensor, top_k: list[int], top_p: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best tokens of each row (values / temperature, descending) and their ids, with those top-k
    then top-p (over the top-k renormalized mass) drop set to -inf and trailing dropped slots trimmed.
    Cuts are by value, so ties at a cut stay or go together."""
    vocab = logits.shape[1]
    ks = [k if 0 < k < vocab else vocab for k in top_k]
    k_on = torch.tensor([k < vocab for k in ks], device=logits.device).unsqueeze(1)
    any_k = any(k < vocab for k in ks)
    p = _column(top_p, logits)
    p_only = any(k == vocab and tp < 1.0 for k, tp in zip(ks, top_p, strict=True))
    # Top-p without top-k measures mass against the whole row: the only full pass besides the topk. A
    # softmax reduces each row by itself; a plain sum over a lone row may be split across threads and
    # round differently than the same row inside a batch.
    full_probs = torch.softmax(logits / temps, dim=-1) if p_only else None
    k_need = max([k + 1 for k in ks if k < vocab], default=0)  # +1: see `spilled` in _cut
    first = max(k_need, _FIRST_WINDOW if p_only else 0)
    # Temperature keeps the order, so the partial sort runs on the raw logits.
    for width in sorted({min(vocab, first), min(vocab, first * 16), vocab}):
        vals, ids = logits.topk(width, dim=-1)
        window_probs = None if full_probs is None else full_probs.gather(1, ids)
        vals, spilled = _cut(vals / temps, ks, k_on, any_k, p, any(tp < 1.0 for tp in top_p), window_probs)
        if not spilled:
            break
    # Kept tokens are a prefix of each row; at least one column stays so a row with nothing finite
    # reaches the draw (and fails there) instead of leaving an empty window.
    kept = max(1, int((vals > float("-inf")).sum(dim=-1).max()))
    return vals[:, :kept], ids[:, :kept]


def _cut(
    vals: torch.Tensor,
    ks: list[int],
    k_on: torch.Tensor,
    any_k: bool,
    p: torch.Tensor,
    any_p: bool,
    window_probs: torch.Tensor | None,
) -> tuple[torch.Tensor, bool]:
    """Applies the cuts to a descending window; also says whether a kept token may lie past it.
    `window_probs`: the window's probabilities over the whole row, for rows without top-k."""
    neg_inf = float("-inf")
    width = vals.shape[1]
    kth = vals.gather(1, torch.tensor(ks, device=vals.device).clamp(max=width).sub(1).unsqueeze(1))
    vals = vals.masked_fill(vals < torch.where(k_on, kth, neg_inf), neg_inf)
    spilled = k_on.squeeze(1) & (vals[:, -1] > neg_inf)  # ties at the k-th value run past the window
    if any_p:
        p_on = p < 1.0
        if window_probs is None:
            cum = _prefix_masses(vals)
        else:  # rows without top-k need the whole row's mass, not the window's
            cum = window_probs.cumsum(dim=-1)
            if any_k:
                cum = torch.where(k_on, _prefix_masses(vals), cum)
        # Keep the smallest prefix whose mass reaches p: a token stays while the mass before it is < p.
        before = torch.nn.functional.pad(cum[:, :-1], (1, 0))
        n_keep = (before < p).sum(dim=-1, keepdim=True)
        cut = torch.where(p_on, vals.gather(1, n_keep - 1), neg_inf)
        vals = vals.masked_fill(vals < cut, neg_inf)
    spilled |= vals[:, -1] > neg_inf
    return vals, bool(spilled.any())


def _prefix_masses(vals: torch.Tensor) -> torch.Tensor:
    """Cumulative share of each row's mass over a descending window whose cut tokens are -inf.

    The window is as wide as the batch's widest cut needs, so the total is the last prefix sum and not a
    reduction over the window: a reduction's order, and so its rounding, changes with the width, while a
    CPU cumsum adds a row's values one by one in order and the zeros past its cut change no sum. A row's
    masses are then the same bits whatever its batch mates."""
    cum = (vals - vals[:, :1]).exp().cumsum(dim=-1)
    return cum / cum[:, -1:]


# ---- randomness ---------------------------------------------------------------------------------------


def row_uniforms(requests: list[SamplingRequest], device: torch.device) -> torch.Tensor:
    """One U[0,1) per row: seeded rows from their own generator, the rest from one shared draw."""
    u = torch.rand(len(requests), device=device)
    seeded = [i for i, r in enumerate(requests) if r.generator is not None]
    if seeded:
        draws = [torch.rand(1, generator=g, device=g.device) for g in (requests[i].generator for i in seeded)]
        u[torch.tensor(seeded, device=device)] = torch.cat([d.to(device) for d in draws])
    return u


def inverse_cdf_sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token whose CDF interval (in token-id order) holds u * row mass; probs need not be normalized.
    -1 for a row with no mass to draw from (zero, or NaN from non-finite logits)."""
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    # Strictly below the total, so the search always lands on a real token.
    target = torch.minimum(u.unsqueeze(1) * total, total.nextafter(torch.zeros_like(total)))
    # A zero or NaN total searches past the end: clamp, such rows are marked -1 below.
    idx = torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[1] - 1)
    chosen = probs.gather(1, idx)
    if bool((chosen > 0).all()):  # NaN fails this too, so the common case stays one check
        return idx.squeeze(1)
    # A parallel scan (GPU) can break monotonicity by an ulp and land on a zero-probability token.
    idx = torch.where(chosen > 0, idx, probs.argmax(dim=-1, keepdim=True))
    drawable = torch.isfinite(total) & (total > 0)
    return torch.where(drawable, idx, -1).squeeze(1)


def unsampleable_error(raw: torch.Tensor, request: SamplingRequest) -> SutraError:
    """Why a row (its raw logits) had nothing to sample. Runs only for such rows."""
    if not bool(torch.isfinite(raw).all()):
        return RequestFailedError("the model produced non-finite logits (NaN or infinity) for this request")
    vocab = raw.shape[0]
    banned = {t for t in request.banned_token_ids if 0 <= t < vocab}
    if request.allowed_tokens is not None:
        allowed = bitmask.allowed_ids(request.allowed_tokens, vocab)
        if not allowed:
            return RequestFailedError(
                "no token can be generated: the structured output constraint allows none here"
            )
        if set(allowed) <= banned:
            return InvalidRequestError(
                f"no token can be generated: the structured output constraint allows only {len(allowed)} "
                f"token(s) here (the end of the output), and they are banned until min_tokens="
                f"{request.params.min_tokens} tokens have been generated",
                param="min_tokens",
            )
    if len(banned) == vocab:
        return InvalidRequestError(
            f"no token can be generated: stop_token_ids and the end-of-sequence tokens cover the whole "
            f"vocabulary ({vocab} tokens), and they are banned until min_tokens="
            f"{request.params.min_tokens} tokens have been generated",
            param="stop_token_ids",
        )
    return RequestFailedError(
        "no token could be sampled: after penalties and temperature no token had a finite probability"
    )
