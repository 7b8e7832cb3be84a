"""POST /v1/chat/completions: the model's chat template is applied server-side."""

from __future__ import annotations

import asyncio
import time

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from sutra.engine.client import CompletionDelta
from sutra.errors import InvalidRequestError
from sutra.model.logprobs import TokenLogprobs
from sutra.model.tokenizer import Tokenizer
from sutra.sampling_params import SamplingParams
from sutra.server.common import (
    ChoiceAccumulator,
    ServerState,
    Submitted,
    collect_choices,
    estimate_headers,
    new_id,
    prompt_logprobs_json,
    resolve_max_tokens,
    sse_stream,
    submit_all,
    usage,
)
from sutra.server.errors import APIError
from sutra.server.protocol import ChatCompletionRequest, ChatMessage
from sutra.server.served_model import ServedModel
from sutra.server.structured import prepare_structured
from sutra.server.tool_parsers import make_tool_parser, parser_for_template
from sutra.server.tools import (
    ToolCallStream,
    message_and_finish,
    prompt_messages,
    template_knows_tools,
    tool_request,
)


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


def template_messages(served: ServedModel, messages: list[ChatMessage]) -> list[dict]:
    """The messages as the chat template takes them; 400 for a model without a template."""
    if served.tokenizer is None or not served.tokenizer.has_chat_template:
        raise APIError(
            400,
            f"the model `{served.name}` has no chat template, so a chat cannot be turned into a "
            "prompt; send the prompt text to /v1/completions instead",
            code="chat_template_missing",
        )
    return [m.template_dict() for m in messages]


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest, http_request: Request):
    state.check_request(body)
    state.limits.check_chat(body)
    tools = tool_request(body.tools, body.tool_choice, state.limits.max_tools)
    # tool_choice required or a named function: the grammar engine enforces the call.
    tool_constraint = tools.constraint() if tools is not None else None
    if tool_constraint is not None and body.structured_spec is not None:
        raise InvalidRequestError(
            f"{body.structured_spec.source} cannot be combined with tool_choice required or a named "
            "function, which constrain the reply to the tool call",
            param="tool_choice",
        )
    served = await state.model_for(body.model, http_request)
    engine = served.engine
    # Compiled off the event loop, before queueing.
    await prepare_structured(engine, tool_constraint or body.structured_spec)
    template = engine.tokenizer.chat_template
    native_tools = template_knows_tools(template)
    messages, rendered_tools = prompt_messages(template_messages(served, body.messages), tools, native_tools)
    prompt = await engine.apply_chat_template(messages, body.add_generation_prompt, rendered_tools)
    parser = make_tool_parser(
        state.tool_call_parser or (parser_for_template(template) if native_tools else "hermes")
    )
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"

    def make_params(prompt_len: int) -> SamplingParams:
        max_tokens = resolve_max_tokens(
            body.requested_max_tokens,
            prompt_len,
            engine.max_model_len,
            param,
            engine.max_request_tokens,
        )
        params = body.sampling_params(max_tokens, body.num_logprobs, engine.tokenizer.generation_defaults)
        if tool_constraint is not None:
            params.structured_outputs = tool_constraint
        return params

    request_id = new_id("chatcmpl")
    submitted = await submit_all(served, request_id, [prompt], make_params, state.spec_of(http_request, body))
    tok = engine.tokenizer
    headers = await estimate_headers(served, submitted)
    if body.stream:
        streams = {i: ToolCallStream(tools, parser) for i in range(body.n)} if tools else {}

        def to_choice(_: Submitted, c: CompletionDelta) -> dict:
            finish_reason = c.finish_reason
            if tools is not None:
                delta, finish_reason = streams[c.index].delta(c.text, c.finish_reason)
            else:
                delta = {"content": c.text} if c.text else {}
            return {
                "index": c.index,
                "delta": delta,
                "logprobs": chat_logprobs(tok, c.logprobs or []) if body.logprobs else None,
                "finish_reason": finish_reason,
                "stop_reason": c.stop_reason,
            }

        # The role comes first, alone, as OpenAI sends it.
        role = {"role": "assistant", "content": ""}
        events = sse_stream(
            served,
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

    choices, cached = await collect_choices(served, http_request, submitted)

    def message(acc: ChoiceAccumulator) -> tuple[dict, str | None]:
        if tools is None:
            return {"role": "assistant", "content": acc.text}, acc.finish_reason
        return message_and_finish(tools.reply(acc.text, parser), acc.finish_reason)

    replies = [message(acc) for acc in choices]
    response: dict = {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": served.name,
        "choices": [
            {
                "index": i,
                "message": reply,
                "logprobs": chat_logprobs(tok, acc.logprobs) if body.logprobs else None,
                "finish_reason": finish_reason,
                "stop_reason": acc.stop_reason,
            }
            for i, (acc, (reply, finish_reason)) in enumerate(zip(choices, replies, strict=True))
        ],
        # The prompt is counted once, whatever n is (as OpenAI and vLLM count it).
        "usage": usage(len(prompt), sum(len(a.token_ids) for a in choices), cached),
    }
    if body.prompt_logprobs is not None:  # vLLM's: one list for the request, beside its choices
        scored = submitted[0].prompt_logprobs or []
        response["prompt_logprobs"] = await asyncio.to_thread(prompt_logprobs_json, tok, scored)
    return JSONResponse(response, headers=headers)
