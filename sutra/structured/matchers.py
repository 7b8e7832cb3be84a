"""The model runner's grammar state: one matcher per constrained request it holds.

A matcher is built when its request is first sampled, by replaying the tokens the request generated
before (none for a new request; all of them for one resumed after preemption or adopted from another
instance), and dropped with the runner's own state of the request. Filling a step's masks changes no
matcher, so a step that raised can be run again; only `accept` advances one, after sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sutra.errors import RequestFailedError, SutraError
from sutra.structured import bitmask
from sutra.structured.backend import GrammarMatcher
from sutra.structured.compiler import StructuredCompiler
from sutra.structured.params import StructuredOutputsParams


@dataclass
class ConstrainedRow:
    request_id: str
    spec: StructuredOutputsParams
    token_ids: list[int]  # prompt and output
    num_prompt_tokens: int


class RequestGrammars:
    def __init__(self, compiler: StructuredCompiler, eos_token_ids: Sequence[int]) -> None:
        self._compiler = compiler  # its grammar engine is loaded on the first constrained request
        self._eos = tuple(eos_token_ids)
        self._matchers: dict[str, GrammarMatcher] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._matchers

    def forget(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def masks(self, rows: Sequence[ConstrainedRow]) -> dict[str, torch.Tensor]:
        """Each row's token bitmask for this step (request id -> its row of one bitmask). Raises
        RequestFailedError for a request whose matcher cannot go on; builds missing matchers."""
        compiler = self._compiler
        backend = compiler.backend
        matchers = [self._matcher(compiler, row) for row in rows]
        mask = bitmask.allocate(len(rows), compiler.vocab_size)
        live: list[tuple[GrammarMatcher, int]] = []
        for i, matcher in enumerate(matchers):
            if matcher.is_terminated():  # complete: only end-of-sequence may follow
                bitmask.allow_only(mask, i, self._eos)
            else:
                live.append((matcher, i))
        if live:
            backend.fill_bitmasks(live, mask)
        for matcher, _ in live:
            if (error := matcher.error()) is not None:
                raise RequestFailedError(f"the structured output constraint cannot go on: {error}")
        return {row.request_id: mask[i] for i, row in enumerate(rows)}

    def accept(self, request_id: str, token_id: int) -> SutraError | None:
        """Advance the request's matcher by its sampled token; an error if the grammar refuses it."""
        matcher = self._matchers.get(request_id)
        if matcher is None or matcher.is_terminated():
            return None
        if matcher.accept_token(token_id):
            return None
        self._matchers.pop(request_id)
        reason = matcher.error() or "the grammar does not allow it"
        return RequestFailedError(
            f"the sampled token {token_id} breaks the structured output constraint: {reason}"
        )

    def _matcher(self, compiler: StructuredCompiler, row: ConstrainedRow) -> GrammarMatcher:
        matcher = self._matchers.get(row.request_id)
        if matcher is None:
            matcher = compiler.matcher(row.spec, row.token_ids[row.num_prompt_tokens :])
            self._matchers[row.request_id] = matcher
        return matcher
