"""The model runner's grammar state: one matcher per constrained request it holds.

A matcher is built when its request is first sampled, by replaying the tokens the request generated
before (none for a new request; all of them for one resumed after preemption or adopted from another
instance), and dropped with the runner's own state of the request. Filling a step's masks changes no
matcher, so a step that raised can be run again; only `accept` advances one, after sampling.

Who is told what when a request's grammar cannot go on:
- the spec's doing (its grammar allows no token after the output so far, or a step goes past the
  grammar engine's work limits, or it does not compile in time): InvalidRequestError naming the
  spec's field, a 400. The step does not raise for it: the request's mask row allows every token, and
  `accept` returns the error in place of the token drawn, so the request ends alone with it while its
  batch mates go on (the runner reports what `accept` returns as that request's failure);
- the engine's (a matcher error of any other kind, a token drawn under the mask that the matcher
  refuses, tokens that do not replay): RequestFailedError, a 500.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sutra.errors import InvalidRequestError, RequestFailedError, SutraError
from sutra.structured import bitmask
from sutra.structured.backend import GrammarMatcher
from sutra.structured.compiler import StructuredCompiler
from sutra.structured.params import StructuredOutputsParams

logger = logging.getLogger(__name__)


@dataclass
class ConstrainedRow:
    request_id: str
    spec: StructuredOutputsParams
    token_ids: list[int]  # prompt and output
    num_prompt_tokens: int


@dataclass
class _Held:
    matcher: GrammarMatcher
    spec: StructuredOutputsParams


class RequestGrammars:
    def __init__(self, compiler: StructuredCompiler, eos_token_ids: Sequence[int]) -> None:
        self._compiler = compiler  # its grammar engine is loaded on the first constrained request
        self._eos = tuple(eos_token_ids)
        self._held: dict[str, _Held] = {}
        # Requests of the last masks() whose spec cannot go on: `accept` returns the error.
        self._failed: dict[str, InvalidRequestError] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._held

    def forget(self, request_id: str) -> None:
        self._held.pop(request_id, None)
        self._failed.pop(request_id, None)

    def masks(self, rows: Sequence[ConstrainedRow]) -> dict[str, torch.Tensor]:
        """Each row's token bitmask for this step (request id -> its row of one bitmask); builds
        missing matchers. A row whose spec cannot go on allows every token, and its error waits for
        `accept`. Raises RequestFailedError for a request whose matcher fails by the engine's fault."""
        compiler = self._compiler
        backend = compiler.backend
        mask = bitmask.allocate(len(rows), compiler.vocab_size)
        live: list[tuple[GrammarMatcher, int]] = []
        for i, row in enumerate(rows):
            self._failed.pop(row.request_id, None)  # from a step that raised: decided again here
            try:
                matcher = self._matcher(compiler, row)
            except (
                InvalidRequestError
            ) as e:  # e.g. its spec was dropped from the cache and recompiles too slowly
                self._fail(mask, i, row, e)
                continue
            # The error first: a matcher stopped on an error also reads as terminated.
            if matcher.error() is not None:
                self._fail(mask, i, row, self._cannot_go_on(row, matcher))
            elif matcher.is_terminated():  # complete: only end-of-sequence may follow
                bitmask.allow_only(mask, i, self._eos)
            else:
                live.append((matcher, i))
        if live:
            backend.fill_bitmasks(live, mask)
            # A grammar engine may report a dead end as an error, or only as a row allowing nothing.
            empty = (mask[torch.tensor([i for _, i in live])] == 0).all(dim=1).tolist()
            for (matcher, i), allows_none in zip(live, empty, strict=True):
                if matcher.error() is not None or allows_none:
                    self._fail(mask, i, rows[i], self._cannot_go_on(rows[i], matcher))
        return {row.request_id: mask[i] for i, row in enumerate(rows)}

    def accept(self, request_id: str, token_id: int) -> SutraError | None:
        """Advance the request's matcher by its sampled token; an error if the grammar refuses it,
        or if masks() found that the request's spec cannot go on."""
        failed = self._failed.pop(request_id, None)
        if failed is not None:
            self._held.pop(request_id, None)
            return failed
        held = self._held.get(request_id)
        if held is None or held.matcher.is_terminated():
            return None
        matcher = held.matcher
        if matcher.accept_token(token_id):
            return None
        self._held.pop(request_id)
        if matcher.error() is not None and matcher.fault() == "too_complex":
            return _too_complex(held.spec, matcher.error() or "")
        reason = _first_line(matcher.error()) or "the grammar does not allow it"
        logger.warning(
            "request %s: sampled token %d refused by its grammar: %s", request_id, token_id, reason
        )
        return RequestFailedError(
            f"the sampled token {token_id} breaks the structured output constraint: {reason}"
        )

    def _matcher(self, compiler: StructuredCompiler, row: ConstrainedRow) -> GrammarMatcher:
        held = self._held.get(row.request_id)
        if held is None:
            matcher = compiler.matcher(row.spec, row.token_ids[row.num_prompt_tokens :])
            held = self._held[row.request_id] = _Held(matcher, row.spec)
        return held.matcher

    def _fail(self, mask: torch.Tensor, i: int, row: ConstrainedRow, error: SutraError) -> None:
        """The request ends with `error`: as a spec fault through `accept`, else raised for the step."""
        if not isinstance(error, InvalidRequestError):
            raise error
        mask[i].fill_(-1)  # every bit: the draw is never used, it only must not fail for want of a token
        self._failed[row.request_id] = error

    @staticmethod
    def _cannot_go_on(row: ConstrainedRow, matcher: GrammarMatcher) -> SutraError:
        spec = row.spec
        error = matcher.error()
        fault = "dead_end" if error is None else matcher.fault()  # no error: a row allowing nothing
        if fault == "dead_end":
            n = len(row.token_ids) - row.num_prompt_tokens
            return InvalidRequestError(
                f"{spec.source}: the {spec.kind_name} allows no token after the {n} output token(s) so "
                f"far: no output can continue from there and match it (a part of it can match nothing)",
                param=spec.source,
            )
        if fault == "too_complex":
            return _too_complex(spec, error or "")
        return RequestFailedError(f"the structured output constraint cannot go on: {_first_line(error)}")


def _too_complex(spec: StructuredOutputsParams, error: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"{spec.source}: following the {spec.kind_name} took more work than the grammar engine allows "
        f"for one token ({_first_line(error)}); send a simpler or less ambiguous one",
        param=spec.source,
    )


def _first_line(error: str | None) -> str:
    """The error's first line: the grammar engine may append its parser state, which is not for clients."""
    return (error or "").split("\n", 1)[0].strip()
