"""OpenAI request bodies (pydantic) and their mapping to SamplingParams.

Fields follow OpenAI's API plus the extensions vLLM users rely on (top_k, min_p, repetition_penalty,
ignore_eos, stop_token_ids, priority). Unknown fields are ignored, as vLLM does. Features OpenAI or vLLM
define that we do not implement are declared here only to be refused by name: a client relying on one
must not get an answer that silently ignored it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from sutra.errors import InvalidRequestError
from sutra.sampling_params import MAX_LOGPROBS, SamplingParams, StructuredOutputsParams
from sutra.server.structured import structured_spec

_REFUSED_WHEN_SET = (
    "guided_decoding_backend",
    "guided_whitespace_pattern",
    "bad_words",
    "allowed_token_ids",
    "logits_processors",
    "truncate_prompt_tokens",
)


class StreamOptions(BaseModel):
    include_usage: bool = False


class CheckedText(BaseModel):
    """A request body whose strings must be Unicode text (see check_text)."""

    def check_text(self) -> None:
        """Refuse a string holding a lone UTF-16 surrogate: JSON's \\ud800 escape allows it, but it is
        not Unicode text, and no tokenizer, template or log line can encode it."""
        if (where := _lone_surrogate_at(self, "")) is not None:
            raise InvalidRequestError(
                f"{where} contains a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), "
                "which is not valid Unicode text",
                param=where,
            )


class ChatTemplateOptions(BaseModel):
    """How messages become a prompt: what chat completions and /tokenize share."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None

    def check_template_options(self) -> None:
        if self.continue_final_message:
            raise InvalidRequestError(
                "continue_final_message is not supported", param="continue_final_message"
            )
        if self.chat_template is not None:
            raise InvalidRequestError(
                "chat_template is not supported: the model's own template is applied", param="chat_template"
            )


class SamplingFields(CheckedText):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    priority: int = 0
    # Requests share prefix-cache blocks only with requests of the same salt (vLLM's field).
    cache_salt: str | None = Field(default=None, min_length=1, max_length=1024)
    # Structured outputs (sutra.server.structured): OpenAI's response_format, vLLM's structured_outputs
    # and its older guided_* aliases; at most one of them.
    response_format: dict[str, Any] | None = None
    structured_outputs: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    # The spec they ask for, read by check_supported().
    _structured: StructuredOutputsParams | None = PrivateAttr(default=None)
    # vLLM's: the logprob of each prompt token with this many alternatives (non-streaming only).
    prompt_logprobs: int | None = None
    # vLLM's extensions we do not implement (refused when set).
    guided_decoding_backend: Any = None
    guided_whitespace_pattern: Any = None
    bad_words: Any = None
    allowed_token_ids: Any = None
    logits_processors: Any = None
    truncate_prompt_tokens: Any = None

    @property
    def include_usage(self) -> bool:
        """A final chunk with usage is wanted (streaming only)."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def check_supported(self) -> None:
        """Refuse, by name, every feature the request asks for that the server does not implement."""
        for name in _REFUSED_WHEN_SET:
            if getattr(self, name) is not None:
                raise InvalidRequestError(f"{name} is not supported", param=name)
        if self.prompt_logprobs is not None and self.stream:
            raise InvalidRequestError(  # as vLLM: they would all arrive before the first token anyway
                "prompt_logprobs is not available when stream is true", param="prompt_logprobs"
            )
        self._structured = structured_spec(self)

    @property
    def structured_spec(self) -> StructuredOutputsParams | None:
        """The structured output the request asks for (set by check_supported), or None."""
        return self._structured

    def sampling_params(
        self,
        max_tokens: int,
        logprobs: int | None,
        defaults: Mapping[str, float | int] | None = None,
        prompt_logprobs: int | None = None,
    ) -> SamplingParams:
        """The request's sampling; a field it leaves unset takes `defaults` (the model's generation
        config) if that has it, else SamplingParams' own default."""
        given = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
        }
        return SamplingParams(
            n=self.n,
            seed=self.seed,
            max_tokens=max_tokens,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs if prompt_logprobs is None else prompt_logprobs,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            logit_bias=self.logit_bias,
            structured_outputs=self._structured,
            **{**(defaults or {}), **{k: v for k, v in given.items() if v is not None}},
        )


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise InvalidRequestError("suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError("best_of other than n is not supported", param="best_of")

    @property
    def num_prompt_logprobs(self) -> int | None:
        """The engine's prompt_logprobs: with echo, logprobs cover the prompt's tokens too."""
        if self.echo and self.logprobs is not None:
            return max(self.logprobs, self.prompt_logprobs or 0)
        return self.prompt_logprobs

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: one string, a list of strings, one token list, or a list of them."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallMessage(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallMessage] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    def template_dict(self) -> dict[str, Any]:
        """The message as chat templates expect it: text parts joined into one string."""
        content = self.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.get("type") != "text":
                    raise InvalidRequestError(
                        f"content parts of type {part.get('type')!r} are not supported; send text",
                        param="messages",
                    )
                texts.append(str(part.get("text", "")))
            content = "".join(texts)
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": content}
        if self.name:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class ChatCompletionRequest(SamplingFields, ChatTemplateOptions):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    functions: list[dict[str, Any]] | None = None
    function_call: Any = None
    echo: bool = False

    def check_supported(self) -> None:
        super().check_supported()
        # The deprecated functions API: its successor, tools, is supported.
        if self.functions:
            raise InvalidRequestError("functions are not supported: send tools", param="functions")
        if self.function_call not in (None, "none"):
            raise InvalidRequestError(
                'function_call is not supported: send tool_choice (null or "none" only)',
                param="function_call",
            )
        self.check_template_options()
        if self.echo:
            raise InvalidRequestError("echo is not supported", param="echo")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise InvalidRequestError(
                f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}", param="top_logprobs"
            )

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def _lone_surrogate_at(value: Any, path: str) -> str | None:
    """The dotted path (as in validation errors: messages.0.content) of the first string in `value`
    that cannot be encoded as UTF-8, or None."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or None
        return None
    if isinstance(value, BaseModel):
        items: Any = [*value.__dict__.items(), *(value.__pydantic_extra__ or {}).items()]
    elif isinstance(value, dict):
        for key in value:
            if _lone_surrogate_at(key, path) is not None:
                return path  # the key itself cannot be shown
        items = value.items()
    elif isinstance(value, list):
        if not any(issubclass(kind, _MAY_HOLD_TEXT) for kind in set(map(type, value))):
            return None  # e.g. the ids of a token prompt, checked without a Python call per number
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        if (found := _lone_surrogate_at(item, f"{path}.{key}" if path else str(key))) is not None:
            return found
    return None


_MAY_HOLD_TEXT = (str, list, dict, BaseModel)


class EmbeddingRequest(CheckedText):
    """OpenAI's embeddings body (POST /v1/embeddings). `input` is checked by inputs(), so that every
    wrong shape is refused naming `input` (a pydantic union would name one of its members)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: Any
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None  # only the model's hidden size: embeddings are not truncated
    user: str | None = None
    priority: int = 0
    cache_salt: str | None = Field(default=None, min_length=1, max_length=1024)
    # vLLM's extensions we do not implement (refused when set).
    truncate_prompt_tokens: Any = None
    normalize: bool | None = None

    def check_supported(self) -> None:
        if self.truncate_prompt_tokens is not None:
            raise InvalidRequestError(
                "truncate_prompt_tokens is not supported", param="truncate_prompt_tokens"
            )
        if self.normalize is False:
            raise InvalidRequestError(
                "normalize=false is not supported: embeddings are L2-normalized", param="normalize"
            )

    def inputs(self) -> list[str | list[int]]:
        """The batch: one string, a list of strings, one token-id list, or a list of them. Each must
        be non-empty."""
        given = self.input
        if isinstance(given, str):
            given = [given]
        elif _is_token_ids(given) and given:
            given = [given]
        if not isinstance(given, list) or not given:
            raise InvalidRequestError(
                "input must be a non-empty string, a list of strings, a list of token ids or a list of "
                "token-id lists",
                param="input",
            )
        for i, item in enumerate(given):
            if not (isinstance(item, str) or _is_token_ids(item)):
                raise InvalidRequestError(
                    f"input[{i}] must be a string or a list of token ids, got {type(item).__name__}",
                    param="input",
                )
            if not item:
                raise InvalidRequestError(f"input[{i}] is empty", param="input")
        return [item if isinstance(item, str) else list(item) for item in given]


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
