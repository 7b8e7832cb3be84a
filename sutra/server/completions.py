"""POST /v1/completions: text (or token-id) prompts, one or many, streamed or whole."""

from __future__ import annotations

import time

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from sutra.engine.async_engine import CompletionDelta
from sutra.model.sampling import TokenLogprobs
from sutra.model.tokenizer import Tokenizer
from sutra.sampling_params import SamplingParams
from sutra.server.common import (
    ServerState,
    Submitted,
    collect_choices,
    estimate_headers,
    new_id,
    resolve_max_tokens,
    sse_stream,
    submit_all,
    usage,
)
from sutra.server.protocol import CompletionRequest


def completion_logprobs(tok: Tokenizer, entries: list[TokenLogprobs], text_start: int) -> dict:
    """The legacy completions logprobs object: parallel lists of tokens, logprobs and alternatives."""
    tokens = [tok.id_to_token_text(e.token_id) for e in entries]
    offsets, at = [], text_start
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{tok.id_to_token_text(i): lp for i, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


async def create_completion(state: ServerState, body: CompletionRequest, http_request: Request):
    state.check_model(body.model)
    engine = state.engine
    prompts = [p if isinstance(p, list) else await engine.encode(p) for p in body.prompts()]

    def make_params(prompt_len: int) -> SamplingParams:
        max_tokens = resolve_max_tokens(body.max_tokens, prompt_len, engine.max_model_len, "max_tokens")
        return body.sampling_params(max_tokens, body.logprobs)

    request_id = new_id("cmpl")
    client = state.client_of(http_request, body.user)
    submitted = submit_all(state, request_id, prompts, make_params, client, body.priority)
    tok = engine.tokenizer
    headers = await estimate_headers(state, submitted)
    if body.stream:
        text_len: dict[int, int] = {}

        def to_choice(sub: Submitted, c: CompletionDelta) -> dict:
            index = sub.first_choice + c.index
            start = text_len.get(index, 0)
            text_len[index] = start + len(c.text)
            logprobs = None if body.logprobs is None else completion_logprobs(tok, c.logprobs or [], start)
            return _choice(index, c.text, logprobs, c.finish_reason, c.stop_reason)

        events = sse_stream(
            state,
            http_request,
            request_id,
            submitted,
            object_name="text_completion",
            include_usage=body.include_usage,
            to_choice=to_choice,
        )
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)

    choices, cached = await collect_choices(state, http_request, submitted)
    return JSONResponse(
        {
            "id": request_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": state.model_name,
            "choices": [
                _choice(
                    i,
                    acc.text,
                    None if body.logprobs is None else completion_logprobs(tok, acc.logprobs, 0),
                    acc.finish_reason,
                    acc.stop_reason,
                )
                for i, acc in enumerate(choices)
            ],
            "usage": usage(
                sum(s.prompt_len * s.num_choices for s in submitted),
                sum(len(acc.token_ids) for acc in choices),
                cached,
            ),
        },
        headers=headers,
    )


def _choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None, stop_reason) -> dict:
    return {
        "index": index,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
        "stop_reason": stop_reason,
    }
