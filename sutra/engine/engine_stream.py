"""A request's stream on a local engine: what its reader has been handed so far, and the next delta
made from the request's output after a step."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from sutra.core.request import RequestSpec
from sutra.engine.client import CompletionDelta, RequestDelta
from sutra.engine.streams import Stream
from sutra.outputs import RequestOutput
from sutra.sampling_params import SamplingParams


def stop_holdback(params: SamplingParams) -> int:
    """Characters to keep back while the end of the text may be the start of a stop string."""
    return max((len(s) for s in params.stop), default=1) - 1


@dataclass(kw_only=True)
class EngineStream(Stream):
    params: SamplingParams
    sent_text: list[int]  # per completion: characters already handed out
    sent_tokens: list[int]
    holdback: int  # stop_holdback(params)
    sent_prompt_logprobs: bool = False  # handed out already (with the first tokens)

    @classmethod
    def opened(
        cls,
        params: SamplingParams,
        spec: RequestSpec,
        prompt_token_ids: list[int],
        arrival_time: float,
        sent: tuple[int, int] | None = None,
    ) -> EngineStream:
        """A new request's stream (on the running event loop), or with `sent` = (characters, tokens)
        the stream of a single-sample request arriving from another instance, continuing from there."""
        sent_text, sent_tokens = ([0] * params.n, [0] * params.n) if sent is None else ([sent[0]], [sent[1]])
        return cls(
            queue=asyncio.Queue(),
            spec=spec,
            prompt_token_ids=prompt_token_ids,
            arrival_time=arrival_time,
            admitted=asyncio.get_running_loop().create_future(),
            params=params,
            sent_text=sent_text,
            sent_tokens=sent_tokens,
            holdback=stop_holdback(params),
            sent_prompt_logprobs=sent_tokens[0] > 0,
        )

    def next_delta(self, out: RequestOutput) -> RequestDelta:
        """What the request gained since the last delta; advances what counts as handed out."""
        completions = []
        for i, c in enumerate(out.outputs):
            # Text that could be the start of a stop string stays back until it cannot be.
            end = len(c.text) if c.finished else max(self.sent_text[i], len(c.text) - self.holdback)
            text, self.sent_text[i] = c.text[self.sent_text[i] : end], end
            tokens = c.token_ids[self.sent_tokens[i] :]
            logprobs = None if c.logprobs is None else c.logprobs[self.sent_tokens[i] :]
            self.sent_tokens[i] = len(c.token_ids)
            completions.append(CompletionDelta(i, text, tokens, logprobs, c.finish_reason, c.stop_reason))
        prompt_logprobs = None
        if out.prompt_logprobs is not None and not self.sent_prompt_logprobs:
            if out.finished or any(c.token_ids for c in completions):  # the prompt is scored by then
                prompt_logprobs, self.sent_prompt_logprobs = out.prompt_logprobs, True
        return RequestDelta(
            out.request_id,
            completions,
            len(out.prompt_token_ids),
            out.finished,
            out.metrics,
            prompt_logprobs,
            out.embedding if out.finished else None,
        )
