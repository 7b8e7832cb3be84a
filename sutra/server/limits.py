"""Bounds on every size a client controls, checked before a request costs the server any work.

Sizes the engine bounds by itself (prompt tokens and max_tokens by the context length, logprobs and
top_logprobs at 20) are not repeated here. Each breach is a 400 naming the field and the limit.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from sutra.errors import InvalidRequestError
from sutra.sampling_params import MAX_N
from sutra.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields


@dataclass(frozen=True)
class RequestLimits:
    # Each of the n samples is a sequence in the batch; OpenAI's own bound.
    max_n: int = MAX_N
    # Stop strings are searched for after every token, so their count and length cost time per step.
    max_stop_strings: int = 64
    max_stop_string_chars: int = 1024
    max_stop_token_ids: int = 1024
    # Each prompt of a /v1/completions batch is one request in the waiting queue.
    max_prompts_per_batch: int = 256
    # The chat template renders every message before the prompt's length can be checked.
    max_chat_messages: int = 2048
    # `user` labels the client's series in /metrics.
    max_user_chars: int = 256
    # Each logit_bias entry is added to the logits at every step of the request (OpenAI's bound).
    max_logit_bias: int = 300
    # Each tool's schema is rendered into the prompt, and under tool_choice required compiled into
    # one grammar with all the others.
    max_tools: int = 128
    # Refused by its content-length header, or while a chunked body is read (413).
    max_body_bytes: int = 16 * 2**20

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{f.name} must be a positive integer, got {value!r}")
        if self.max_n > MAX_N:
            raise ValueError(f"max_n must be at most {MAX_N}, got {self.max_n}")

    def check_completion(self, body: CompletionRequest) -> None:
        self._check_sampling(body)
        prompt = body.prompt
        # A flat list of token ids is one prompt; a list of strings or of id lists is a batch.
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            _at_most(len(prompt), self.max_prompts_per_batch, "prompt", "prompts in one request")

    def check_chat(self, body: ChatCompletionRequest) -> None:
        self._check_sampling(body)
        self.check_messages(body.messages)

    def check_messages(self, messages: list) -> None:
        _at_most(len(messages), self.max_chat_messages, "messages", "messages")

    def _check_sampling(self, body: SamplingFields) -> None:
        _at_most(body.n, self.max_n, "n", "choices (n)")
        stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
        _at_most(len(stops), self.max_stop_strings, "stop", "stop strings")
        for stop in stops:
            _at_most(len(stop), self.max_stop_string_chars, "stop", "characters in a stop string")
        _at_most(len(body.stop_token_ids or []), self.max_stop_token_ids, "stop_token_ids", "stop token ids")
        _at_most(len(body.user or ""), self.max_user_chars, "user", "characters in user")
        _at_most(len(body.logit_bias or {}), self.max_logit_bias, "logit_bias", "logit_bias entries")


_HELP = {
    "max_n": "most choices (n) in one request",
    "max_stop_strings": "most stop strings in one request",
    "max_stop_string_chars": "most characters in one stop string",
    "max_stop_token_ids": "most stop_token_ids in one request",
    "max_prompts_per_batch": "most prompts in one /v1/completions request",
    "max_chat_messages": "most messages in one chat request",
    "max_user_chars": "most characters in the user field",
    "max_logit_bias": "most logit_bias entries in one request",
    "max_tools": "most tools in one chat request",
    "max_body_bytes": "largest request body in bytes (413 above it)",
}


def add_limit_args(parser: argparse.ArgumentParser) -> None:
    """One `sutra serve` flag per limit: --max-n, --max-stop-strings, ..."""
    g = parser.add_argument_group("request limits (each breach is refused with 400, or 413 for the body)")
    for f in fields(RequestLimits):
        g.add_argument(
            "--" + f.name.replace("_", "-"),
            type=int,
            default=f.default,
            help=f"{_HELP[f.name]} (%(default)s)",
        )


def limits_from_args(args: argparse.Namespace) -> RequestLimits:
    try:
        return RequestLimits(**{f.name: getattr(args, f.name) for f in fields(RequestLimits)})
    except ValueError as e:
        raise SystemExit(f"error: --{str(e).replace('_', '-')}") from e


def _at_most(value: int, limit: int, param: str, what: str) -> None:
    if value > limit:
        raise InvalidRequestError(f"{param}: at most {limit} {what} are allowed, got {value}", param=param)
