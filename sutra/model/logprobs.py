"""Logprobs: of each sampled token (with its rank and the top alternatives) and of each prompt token
(prompt_logprobs), from the model's own distribution: the raw logits, before any mask, bias or
penalty (vLLM's raw logprobs)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sutra.sampling_params import SamplingParams


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


def compute_logprobs(
    raw: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams]
) -> list[TokenLogprobs | None]:
    out: list[TokenLogprobs | None] = [None] * len(params)
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return out
    idx = torch.tensor(rows, device=raw.device)
    lp = torch.log_softmax(raw if len(rows) == len(params) else raw[idx], dim=-1)
    entries = logprob_entries(lp, tokens[idx], [params[i].logprobs or 0 for i in rows])
    for i, entry in zip(rows, entries, strict=True):
        out[i] = entry
    return out


def logprob_entries(lp: torch.Tensor, tokens: torch.Tensor, top_ns: list[int]) -> list[TokenLogprobs]:
    """Row i of log-probabilities lp [rows, vocab]: token i's logprob and rank, and the top_ns[i]
    most likely tokens."""
    chosen = lp.gather(1, tokens.unsqueeze(1))
    ranks = ((lp > chosen).sum(dim=-1) + 1).tolist()
    top_n = min(max(top_ns), lp.shape[1])  # a vocabulary may be < 20
    top_vals, top_ids = lp.topk(top_n, dim=-1) if top_n else (lp[:, :0], lp[:, :0].long())
    token_ids = tokens.tolist()
    chosen_l, top_vals_l, top_ids_l = chosen.squeeze(1).tolist(), top_vals.tolist(), top_ids.tolist()
    return [
        TokenLogprobs(
            token_ids[j], chosen_l[j], ranks[j], list(zip(top_ids_l[j][:n], top_vals_l[j][:n], strict=True))
        )
        for j, n in enumerate(top_ns)
    ]


PROMPT_LOGPROB_ROWS = 64  # prompt positions scored at a time: bounds the [rows, vocab] temporaries


def prompt_logprobs(
    logits_of: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: list[int], top_n: int
) -> list[TokenLogprobs]:
    """Each hidden row's logprob of the prompt token that follows it (targets, one per row), with its
    rank and the top_n most likely tokens: the model's own distribution (no bias, mask or penalty).
    Rows are scored PROMPT_LOGPROB_ROWS at a time, so a long prompt chunk never holds its whole
    [tokens, vocab] logits at once."""
    out: list[TokenLogprobs] = []
    for start in range(0, len(targets), PROMPT_LOGPROB_ROWS):
        rows = hidden[start : start + PROMPT_LOGPROB_ROWS]
        lp = torch.log_softmax(logits_of(rows).float(), dim=-1)
        tokens = torch.tensor(targets[start : start + len(rows)], device=lp.device)
        out += logprob_entries(lp, tokens, [top_n] * len(rows))
    return out
