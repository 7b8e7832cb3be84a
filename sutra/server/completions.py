"""POST /v1/completions: text (or token-id) prompts, one or many, streamed or whole."""

from __future__ import annotations

import asyncio
import codecs
import time
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from sutra.engine.client import CompletionDelta
from sutra.model.logprobs import TokenLogprobs
from sutra.model.tokenizer import Tokenizer
from sutra.sampling_params import SamplingParams
from sutra.server.common import (
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
from sutra.server.protocol import CompletionRequest
from sutra.server.structured import prepare_structured


class TextOffsets:
    """Where each token's text starts in a choice's text. Counted from the tokens' bytes, not from
    their printable names: a token holding part of a character is named 'bytes:\\xe4' but adds no
    character until the token that completes it (and a skipped special token adds none)."""

    def __init__(self, tok: Tokenizer, skip_special_tokens: bool) -> None:
        self._tok = tok
        self._skip_special = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # decode() renders as it
        self._chars = 0

    def next(self, token_id: int) -> int:
        at = self._chars
        if not (self._skip_special and self._tok.is_special(token_id)):
            self._chars += len(self._utf8.decode(self._tok.token_bytes(token_id)))
        return at


def completion_logprobs(
    tok: Tokenizer, entries: list[TokenLogprobs], offsets: TextOffsets, echo: EchoedPrompt | None = None
) -> dict:
    """The legacy completions logprobs object: parallel lists of tokens, logprobs and alternatives;
    with echo, the prompt's tokens first (the first with no logprob: nothing predicts it)."""
    prompt = echo.logprobs(tok, offsets) if echo is not None else _legacy_logprobs([], [], [], [])
    return {
        "tokens": prompt["tokens"] + [tok.id_to_token_text(e.token_id) for e in entries],
        "token_logprobs": prompt["token_logprobs"] + [e.logprob for e in entries],
        "top_logprobs": prompt["top_logprobs"]
        + [{tok.id_to_token_text(i): lp for i, lp in e.top} for e in entries],
        "text_offset": prompt["text_offset"] + [offsets.next(e.token_id) for e in entries],
    }


def _legacy_logprobs(tokens: list, token_logprobs: list, top_logprobs: list, text_offset: list) -> dict:
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }


@dataclass
class EchoedPrompt:
    """A prompt echoed with logprobs: its token ids, their scores (RequestOutput.prompt_logprobs) and
    how many alternatives the request asked for."""

    token_ids: list[int]
    scored: list[TokenLogprobs | None] | None
    top_n: int

    def logprobs(self, tok: Tokenizer, offsets: TextOffsets) -> dict:
        scored = self.scored or [None] * len(self.token_ids)
        return _legacy_logprobs(
            [tok.id_to_token_text(t) for t in self.token_ids],
            [None if e is None else e.logprob for e in scored],
            [
                None if e is None else {tok.id_to_token_text(i): lp for i, lp in e.top[: self.top_n]}
                for e in scored
            ],
            [offsets.next(t) for t in self.token_ids],
        )


async def echo_texts(tok: Tokenizer, prompts: list[str | list[int]]) -> list[str]:
    """What each prompt's choices start with under `echo`: a text prompt as sent, a token prompt
    decoded with its special tokens (as vLLM echoes it). The ids must have been validated."""
    return [p if isinstance(p, str) else await asyncio.to_thread(tok.decode, p, False) for p in prompts]


async def create_completion(state: ServerState, body: CompletionRequest, http_request: Request):
    state.check_request(body)
    state.limits.check_completion(body)
    served = await state.model_for(body.model, http_request)
    engine = served.engine
    await prepare_structured(engine, body.structured_spec)  # compiled off the event loop, before queueing
    given = body.prompts()
    prompts = [p if isinstance(p, list) else await engine.encode(p) for p in given]

    def make_params(prompt_len: int) -> SamplingParams:
        max_tokens = resolve_max_tokens(
            body.max_tokens, prompt_len, engine.max_model_len, "max_tokens", engine.max_request_tokens
        )
        return body.sampling_params(
            max_tokens, body.logprobs, engine.tokenizer.generation_defaults, body.num_prompt_logprobs
        )

    request_id = new_id("cmpl")
    submitted = await submit_all(served, request_id, prompts, make_params, state.spec_of(http_request, body))
    tok = engine.tokenizer
    # Per prompt, in the order of `submitted`; empty strings without echo.
    echoes = await echo_texts(tok, given) if body.echo else [""] * len(submitted)
    echo_logprobs = body.echo and body.logprobs is not None

    def echoed_prompt(i: int) -> EchoedPrompt | None:  # the i-th prompt's, with echo and logprobs
        sub = submitted[i]
        return EchoedPrompt(prompts[i], sub.prompt_logprobs, body.logprobs or 0) if echo_logprobs else None

    headers = await estimate_headers(served, submitted)
    if body.stream:
        offsets: dict[int, TextOffsets] = {}  # per choice, across its chunks
        echo_of = {s.request_id: e for s, e in zip(submitted, echoes, strict=True)}
        echoed: set[int] = set()  # choices whose first chunk (which carries the prompt) went out

        def to_choice(sub: Submitted, c: CompletionDelta) -> dict:
            index = sub.first_choice + c.index
            text, echo = c.text, None
            if index not in echoed:
                echoed.add(index)
                text = echo_of[sub.request_id] + text
                echo = echoed_prompt(submitted.index(sub))
            logprobs = None
            if body.logprobs is not None:
                at = offsets.setdefault(index, TextOffsets(tok, body.skip_special_tokens))
                logprobs = completion_logprobs(tok, c.logprobs or [], at, echo)
            return _choice(index, text, logprobs, c.finish_reason, c.stop_reason)

        events = sse_stream(
            served,
            http_request,
            request_id,
            submitted,
            object_name="text_completion",
            include_usage=body.include_usage,
            to_choice=to_choice,
        )
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)

    choices, cached = await collect_choices(served, http_request, submitted)
    scored = None
    if body.prompt_logprobs is not None:  # per prompt, rendered off the event loop: one may be long
        scored = await asyncio.to_thread(
            lambda: [prompt_logprobs_json(tok, s.prompt_logprobs or []) for s in submitted]
        )
    return JSONResponse(
        {
            "id": request_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": served.name,
            "choices": [
                _choice(
                    i,
                    echoes[i // body.n] + acc.text,  # every prompt has n choices
                    None
                    if body.logprobs is None
                    else completion_logprobs(
                        tok,
                        acc.logprobs,
                        TextOffsets(tok, body.skip_special_tokens),
                        echoed_prompt(i // body.n),
                    ),
                    acc.finish_reason,
                    acc.stop_reason,
                    None if scored is None else scored[i // body.n],
                )
                for i, acc in enumerate(choices)
            ],
            "usage": usage(
                sum(s.prompt_len for s in submitted),  # once per prompt, whatever n is
                sum(len(acc.token_ids) for acc in choices),
                cached,
            ),
        },
        headers=headers,
    )


def _choice(
    index: int,
    text: str,
    logprobs: dict | None,
    finish_reason: str | None,
    stop_reason,
    prompt_logprobs: list[dict | None] | None = None,
) -> dict:
    choice = {
        "index": index,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
        "stop_reason": stop_reason,
    }
    if prompt_logprobs is not None:
        choice["prompt_logprobs"] = prompt_logprobs
    return choice
