"""The offline API: `LLM().generate(prompts, params)`, `LLM().chat(messages)` and `LLM().embed(prompts)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Any, Literal, TypedDict

from tqdm import tqdm

from sutra.config import EngineConfig, engine_config
from sutra.core.request import RequestSpec
from sutra.engine.engine import LLMEngine
from sutra.errors import InvalidRequestError
from sutra.outputs import RequestOutput
from sutra.sampling_params import SamplingParams


class _PromptOptions(TypedDict, total=False):
    cache_salt: str  # requests share prefix-cache blocks only with requests of the same salt


class TextPrompt(_PromptOptions):
    """vLLM's text prompt: {"prompt": "..."}."""

    prompt: str


class TokensPrompt(_PromptOptions, total=False):
    """vLLM's token prompt: {"prompt_token_ids": [...]}, optionally with the text they came from
    (reported as RequestOutput.prompt)."""

    prompt_token_ids: list[int]
    prompt: str


Prompt = str | list[int] | TextPrompt | TokensPrompt
Message = dict[str, str]
_PROMPT_KEYS = frozenset({"prompt", "prompt_token_ids", "cache_salt"})


@dataclass(frozen=True)
class _ParsedPrompt:
    text: str | None
    token_ids: list[int] | None
    cache_salt: str | None = None


def parse_prompt(prompt: Any) -> _ParsedPrompt:
    """One prompt in any form generate() takes; InvalidRequestError, naming the key, otherwise."""
    if isinstance(prompt, str):
        return _ParsedPrompt(prompt, None)
    if isinstance(prompt, (list, tuple)):
        return _ParsedPrompt(None, _token_ids(prompt, "prompt"))
    if not isinstance(prompt, dict):
        raise InvalidRequestError(
            "a prompt is a string, a list of token ids, {'prompt': str} or {'prompt_token_ids': [...]}, "
            f"got {type(prompt).__name__}",
            param="prompt",
        )
    for key in prompt:
        if key not in _PROMPT_KEYS:  # multi_modal_data and the like: refused, not ignored
            raise InvalidRequestError(f"prompt key {key!r} is not supported", param=str(key))
    text = prompt.get("prompt")
    if text is not None and not isinstance(text, str):
        raise InvalidRequestError(f"prompt must be a string, got {type(text).__name__}", param="prompt")
    salt = prompt.get("cache_salt")
    if salt is not None and not (isinstance(salt, str) and salt):
        raise InvalidRequestError("cache_salt must be a non-empty string", param="cache_salt")
    if "prompt_token_ids" in prompt:
        return _ParsedPrompt(text, _token_ids(prompt["prompt_token_ids"], "prompt_token_ids"), salt)
    if text is None:
        raise InvalidRequestError(
            "a prompt dict needs 'prompt' (text) or 'prompt_token_ids'", param="prompt_token_ids"
        )
    return _ParsedPrompt(text, None, salt)


def _token_ids(ids: Any, param: str) -> list[int]:
    if not isinstance(ids, (list, tuple)) or not all(
        isinstance(t, Integral) and not isinstance(t, bool) for t in ids
    ):
        raise InvalidRequestError(f"{param} must be a list of integer token ids", param=param)
    return [int(t) for t in ids]


class LLM:
    def __init__(
        self, model: str | None = None, *, config: EngineConfig | None = None, **options: Any
    ) -> None:
        """`model` as `sutra serve --model` takes it (None: the bundled SmolLM2). `options` are the
        engine config's fields by name (sutra/config.py), with the same defaults as the command
        line: dtype, device, max_model_len, seed, num_threads, batch_invariant, chat_template,
        generation_config, block_size, num_kv_blocks, kv_cache_memory_gb, enable_prefix_caching,
        max_num_batched_tokens, max_num_seqs, mode, policy, ... Or a whole EngineConfig as `config`."""
        if config is not None and (options or model is not None):
            raise TypeError("pass either config or the model and engine options, not both")
        self.config = config or engine_config(model=model, **options)
        self.engine = LLMEngine(self.config)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def get_default_sampling_params(self) -> SamplingParams:
        """What a call without SamplingParams samples with: the model's generation_config.json
        defaults unless the engine was built with generation_config="vllm" (as vLLM's LLM does)."""
        return SamplingParams(**self.tokenizer.generation_defaults)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for each prompt (text, token ids, or vLLM's {"prompt": ...} and
        {"prompt_token_ids": [...]} dicts); outputs come back in prompt order. Invalid input raises
        before anything runs; a request that fails while running comes back finished with `error` set
        (the others are unaffected)."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], Integral)):
            prompts = [prompts]  # type: ignore[list-item]
        parsed = [parse_prompt(p) for p in prompts]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or self.get_default_sampling_params()] * len(parsed)
        else:
            params = list(sampling_params)
            if len(params) != len(parsed):
                raise ValueError(f"got {len(parsed)} prompts but {len(params)} sampling params")
        encoded = [self.engine.encode_prompt(p.text if p.token_ids is None else p.token_ids) for p in parsed]
        for ids, p in zip(encoded, params, strict=True):  # reject the batch before queueing any of it
            self.engine.validate(ids, p)
            p.check_vocabulary(self.engine.arch.vocab_size)
        request_ids = [f"offline-{next(self._ids)}" for _ in parsed]
        for rid, prompt, ids, p in zip(request_ids, parsed, encoded, params, strict=True):
            spec = RequestSpec(cache_salt=prompt.cache_salt)
            self.engine.add_request(rid, prompt.text or ids, p, spec=spec, prompt_token_ids=ids)
        return self._run(request_ids, use_tqdm)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def embed(
        self,
        prompts: Prompt | Sequence[Prompt],
        pooling: Literal["last", "mean"] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """The embedding of each prompt (in any form generate() takes), in prompt order: the model's
        final hidden states (after the final norm) pooled over the prompt's tokens, "last" or "mean"
        (None: the engine's `pooling` option), L2-normalized, as RequestOutput.embedding. Computed
        by the same scheduler as generation, so it batches with it; nothing is generated."""
        params = SamplingParams(pooling="default" if pooling is None else pooling, max_tokens=1)
        return self.generate(prompts, params, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="requests", unit="req", disable=not use_tqdm)
        wanted = set(request_ids)
        try:
            while len(finished) < len(request_ids) and self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:
                        finished[out.request_id] = out
                        bar.update(1)
        except BaseException:
            for rid in wanted - finished.keys():
                self.engine.abort_request(rid)
            raise
        finally:
            bar.close()
        return [finished[rid] for rid in request_ids]
