"""vLLM's tokenizer routes, POST /tokenize and POST /detokenize, and what GET /version reports.

Both run the model's own tokenizer (and chat template) in a worker thread, so a long text never holds
the event loop, and neither touches the engine: they answer while it is busy, draining or saturated.
With many models, the tokenizer is the named model's; only the first call for a model that was never
loaded waits for it to load (the tokenizer stays known after the model is evicted).
"""

from __future__ import annotations

import asyncio
from importlib import metadata

from fastapi import Request
from pydantic import BaseModel, ConfigDict

import sutra
from sutra.errors import InvalidRequestError
from sutra.model.tokenizer import Tokenizer
from sutra.server.chat import template_messages
from sutra.server.common import ServerState
from sutra.server.protocol import ChatMessage, ChatTemplateOptions, CheckedText
from sutra.server.tools import prompt_messages, template_knows_tools, tool_request


class TokenizeRequest(CheckedText, ChatTemplateOptions):
    """vLLM's two bodies in one: {model, prompt} tokenizes text, {model, messages} a chat as the chat
    completions route renders it."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    # None: True for a prompt, False for messages (the chat template writes its own, BOS included).
    add_special_tokens: bool | None = None
    # vLLM returns the vocabulary's raw pieces here; refused rather than answered differently.
    return_token_strs: bool | None = None
    tools: list[dict] | None = None  # rendered as chat completions renders them (tool_choice auto)

    def check_supported(self) -> None:
        if self.prompt is None and self.messages is None:
            raise InvalidRequestError("send a prompt (text) or messages (a chat) to tokenize", param="prompt")
        if self.prompt is not None and self.messages is not None:
            raise InvalidRequestError("send either prompt or messages, not both", param="messages")
        if self.return_token_strs:
            raise InvalidRequestError("return_token_strs is not supported", param="return_token_strs")
        if self.tools and self.messages is None:
            raise InvalidRequestError("tools are rendered into a chat: send messages", param="tools")
        self.check_template_options()


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]


async def tokenize(state: ServerState, body: TokenizeRequest, http_request: Request) -> dict:
    state.check_model(body.model)
    body.check_supported()
    body.check_text()
    if body.messages is not None:
        state.limits.check_messages(body.messages)
    tools = tool_request(body.tools, None, state.limits.max_tools)
    # The model's own tokenizer: known once the model has been loaded, so only a first call loads it.
    served = await state.tokenizer_for(body.model, http_request)
    tok = served.tokenizer
    assert tok is not None and served.max_model_len is not None
    if body.messages is not None:
        native = template_knows_tools(tok.chat_template)
        messages, rendered_tools = prompt_messages(template_messages(served, body.messages), tools, native)
        special = bool(body.add_special_tokens)
        ids = await asyncio.to_thread(
            _encode_chat, tok, messages, body.add_generation_prompt, special, rendered_tools
        )
    else:
        special = body.add_special_tokens is None or body.add_special_tokens
        ids = await asyncio.to_thread(tok.encode, body.prompt or "", special)
    # No length check: the answer says how the prompt compares with the context (as vLLM's does).
    return {"count": len(ids), "max_model_len": served.max_model_len, "tokens": ids}


async def detokenize(state: ServerState, body: DetokenizeRequest, http_request: Request) -> dict:
    served = await state.tokenizer_for(body.model, http_request)
    tok = served.tokenizer
    assert tok is not None
    bad = [t for t in body.tokens if not 0 <= t < tok.vocab_size]
    if bad:
        # The tokenizer would skip an unknown id silently, or fail on a negative one.
        raise InvalidRequestError(
            f"tokens: token id {bad[0]} is outside the vocabulary [0, {tok.vocab_size})", param="tokens"
        )
    # Special tokens are kept: the text is what the ids spell, as vLLM decodes them.
    return {"prompt": await asyncio.to_thread(tok.decode, body.tokens, False)}


def _encode_chat(
    tok: Tokenizer,
    messages: list[dict],
    add_generation_prompt: bool,
    add_special_tokens: bool,
    tools: list[dict] | None,
) -> list[int]:
    # Without special tokens this is exactly the prompt the chat completions route submits.
    text = tok.chat_text(messages, add_generation_prompt, tools)
    return tok.encode(text, add_special_tokens=add_special_tokens)


def server_version() -> str:
    """sutra.__version__ if the package defines one, else the installed distribution's version."""
    declared = getattr(sutra, "__version__", None)
    if declared:
        return str(declared)
    try:
        return metadata.version("sutra")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"
