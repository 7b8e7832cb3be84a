"""POST /v1/chat/completions: the model's chat template is applied server-side."""

from __future__ import annotations

import time

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from sutra.engine.client import CompletionDelta
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
from sutra.server.errors import APIError
from sutra.server.protocol import ChatCompletionRequest, ChatMessage


def _token_entry(tok: Tokenizer, token_id: int, logprob: float) -> dict:
    # The token's own bytes: for a piece of a multi-byte character its name ('bytes:\\xe6\\x9d')
    # is not its text, but the bytes of consecutive entries join into the reply's UTF-8.
    return {
        "token": tok.id_to_token_text(token_id),
        "logprob": logprob,
        "bytes": list(tok.token_bytes(token_id)),
    }


def chat_logprobs(tok: Tokenizer, entries: list[TokenLogprobs]) -> dict:
    return {
        "content": [
            {
                **_token_entry(tok, e.token_id, e.logprob),
                "top_logprobs": [_token_entry(tok, i, lp) for i, lp in e.top],
            }
            for e in entries
        ]
    }


def template_messages(state: ServerState, messages: list[ChatMessage]) -> list[dict]:
    """The messages as the chat template takes them; 400 for a model without a template."""
    if not state.engine.tokenizer.has_chat_template:
        raise APIError(
            400,
            f"the model `{state.model_name}` has no chat template, so a chat cannot be turned into a "
            "prompt; send the prompt text to /v1/completions instead",
            code="chat_template_missing",
        )
    return [m.template_dict() for m in messages]


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest, http_request: Request):
    state.check_request(body)
    state.limits.check_chat(body)
    engine = state.engine
    messages = template_messages(state, body.messages)
    prompt = await engine.apply_chat_template(messages, body.add_generation_prompt)
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"

    def make_params(prompt_len: int) -> SamplingParams:
        max_tokens = resolve_max_tokens(
            body.requested_max_tokens,
            prompt_len,
            engine.max_model_len,
            param,
            engine.max_request_tokens,
        )
        return body.sampling_params(max_tokens, body.num_logprobs)

    request_id = new_id("chatcmpl")
    submitted = await submit_all(state, request_id, [prompt], make_params, state.spec_of(http_request, body))
    tok = engine.tokenizer
    headers = await estimate_headers(state, submitted)
    if body.stream:

        def to_choice(_: Submitted, c: CompletionDelta) -> dict:
            return {
                "index": c.index,
                "delta": {"content": c.text} if c.text else {},
                "logprobs": chat_logprobs(tok, c.logprobs or []) if body.logprobs else None,
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            }

        # The role comes first, alone, as OpenAI sends it.
        role = {"role": "assistant", "content": ""}
        events = sse_stream(
            state,
            http_request,
            request_id,
            submitted,
            object_name="chat.completion.chunk",
            include_usage=body.include_usage,
            to_choice=to_choice,
            preamble=[
                {"index": i, "delta": role, "logprobs": None, "finish_reason": None} for i in range(body.n)
            ],
        )
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)

    choices, cached = await collect_choices(state, http_request, submitted)
    return JSONResponse(
        {
            "id": request_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": state.model_name,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": acc.text},
                    "logprobs": chat_logprobs(tok, acc.logprobs) if body.logprobs else None,
                    "finish_reason": acc.finish_reason,
                    "stop_reason": acc.stop_reason,
                }
                for i, acc in enumerate(choices)
            ],
            # The prompt is counted once, whatever n is (as OpenAI and vLLM count it).
            "usage": usage(len(prompt), sum(len(a.token_ids) for a in choices), cached),
        },
        headers=headers,
    )
