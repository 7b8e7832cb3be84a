"""What LLMEngine does for a request that moves between instances (live migration, the
disaggregated hand-off; the protocol is sutra/engine/migration.py): give its output state away, and
take one in. A mixin of LLMEngine, with the per-request output state (Tracked) both use."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sutra.core.request import Request
from sutra.engine.detokenizer import IncrementalDetokenizer
from sutra.engine.migration import MovedRequest
from sutra.errors import InvalidRequestError
from sutra.outputs import CompletionOutput, RequestOutput

if TYPE_CHECKING:
    from sutra.engine.engine import LLMEngine


@dataclass
class Tracked:
    """A user request; with n > 1 it fans out into n scheduler requests sharing the prompt."""

    output: RequestOutput
    child_ids: list[str]
    detokenizers: list[IncrementalDetokenizer]
    num_unfinished: int


class MovedRequests:
    def num_samples(self: LLMEngine, request_id: str) -> int:
        """How many scheduler requests a user request fans out to here; 0 if it is not here."""
        tracked = self._tracked.get(request_id)
        return 0 if tracked is None else len(tracked.child_ids)

    def moved_request(self: LLMEngine, request: Request) -> MovedRequest:
        """A paused single-sample request's state, for its destination."""
        tracked = self._tracked[request.request_id]
        out, completion = tracked.output, tracked.output.outputs[0]
        return MovedRequest(
            request_id=request.request_id,
            prompt=out.prompt,
            prompt_token_ids=list(request.prompt_token_ids),
            output_token_ids=list(request.output_token_ids),
            sampling_params=request.sampling_params,
            spec=request.spec,
            arrival_time=request.arrival_time,
            num_computed_tokens=request.num_computed_tokens,
            num_cached_tokens=request.num_cached_tokens,
            num_preemptions=request.num_preemptions,
            text=completion.text,
            logprobs=None if completion.logprobs is None else list(completion.logprobs),
            metrics=dataclasses.replace(out.metrics),
            detokenizer_state=tracked.detokenizers[0].state(),
            prompt_logprobs=out.prompt_logprobs,
        )

    def forget_moved(self: LLMEngine, request_id: str) -> None:
        """The request went to another instance: drop its output state, emitting nothing."""
        tracked = self._tracked.pop(request_id)
        for child_id in tracked.child_ids:
            self._child_to_parent.pop(child_id, None)

    def adopt_moved(self: LLMEngine, moved: MovedRequest, admit: Callable[[Request], None]) -> None:
        """Track a request arriving from another instance; `admit` puts it in the scheduler (on its
        KV) and may raise, in which case nothing is tracked."""
        if moved.request_id in self._tracked:
            raise InvalidRequestError(
                f"request id {moved.request_id!r} is already in use", param="request_id"
            )
        request = moved.to_request(self.eos_token_ids)
        output = RequestOutput(
            request_id=moved.request_id,
            prompt=moved.prompt,
            prompt_token_ids=list(moved.prompt_token_ids),
            outputs=[
                CompletionOutput(0, moved.text, list(moved.output_token_ids), moved.logprobs),
            ],
            metrics=moved.metrics,
            prompt_logprobs=moved.prompt_logprobs,
        )
        detokenizer = IncrementalDetokenizer(self.tokenizer, moved.prompt_token_ids, moved.sampling_params)
        detokenizer.restore(moved.detokenizer_state)
        admit(request)
        self._tracked[moved.request_id] = Tracked(output, [moved.request_id], [detokenizer], 1)
        self._child_to_parent[moved.request_id] = (moved.request_id, 0)
