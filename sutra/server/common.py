"""What the completion and chat handlers share: server state, request submission, streaming plumbing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from sutra.core.request import RequestSpec
from sutra.engine.client import CompletionDelta, EngineClient, EngineListener, RequestDelta
from sutra.errors import InvalidRequestError, prompt_too_long
from sutra.model.logprobs import TokenLogprobs
from sutra.model.tokenizer import Tokenizer
from sutra.sampling_params import SamplingParams
from sutra.server.errors import APIError, to_api_error
from sutra.server.limits import RequestLimits
from sutra.server.metrics import ServerMetrics
from sutra.server.model_leases import hold
from sutra.server.model_pool import ModelPool
from sutra.server.protocol import SamplingFields
from sutra.server.served_model import ModelLoadFailedError, ModelUnavailableError, ServedModel
from sutra.server.tenants import PriorityCaps


@dataclass
class ServerState:
    """What the routes share. A server of one engine gives `engine` and `model_name`; a server of many
    models gives `pool` (sutra/server/model_pool.py), and then `engine` is None and `model_name` names
    the default model. Either way requests reach their model through model_for()."""

    engine: EngineClient | None = None
    model_name: str = ""
    metrics: ServerMetrics | None = None  # None: ServerMetrics(model_name)
    api_keys: dict[str, str] = field(default_factory=dict)  # key -> tenant; empty: no auth
    limits: RequestLimits = field(default_factory=RequestLimits)
    priority_caps: PriorityCaps = field(default_factory=PriorityCaps)
    admin_key: str | None = None  # opens /admin (servers with Ray instances)
    cluster: Any = None  # sutra.cluster.manager.Cluster when the instances run on Ray
    tool_call_parser: str | None = None  # None: chosen from each model's chat template
    created: int = field(default_factory=lambda: int(time.time()))
    pool: ModelPool = None  # type: ignore[assignment]  # None: a pool of `engine` alone
    engine_listeners: list[EngineListener] = field(default_factory=list)  # on every model's engine

    def __post_init__(self) -> None:
        if self.pool is None:
            if self.engine is None:
                raise ValueError("a server needs an engine or a model pool")
            self.pool = ModelPool.single(self.model_name, self.engine)
        self.model_name = self.model_name or self.pool.default
        if self.metrics is None:
            self.metrics = ServerMetrics(self.model_name)
        metrics = self.metrics
        self.pool.observer = metrics.models
        self.pool.listeners_for = lambda m: [metrics.for_model(m.name), *self.engine_listeners]

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.pool.models:
            served = ", ".join(f"`{name}`" for name in self.pool.models)
            raise APIError(
                404,
                f"The model `{model}` does not exist; this server serves {served}.",
                type="not_found_error",
                param="model",
                code="model_not_found",
            )

    async def model_for(self, model: str | None, http_request: Request) -> ServedModel:
        """The model a request names (None: the default), ready to serve it, and held until the
        response has ended: a cold model is loaded first, which the request waits for."""
        self.check_model(model)
        try:
            lease = await self.pool.acquire(model)
        except ModelUnavailableError as e:
            raise APIError(503, str(e), type="service_unavailable_error", code="model_unavailable") from e
        except ModelLoadFailedError as e:
            raise APIError(500, str(e), type="internal_server_error", code="model_load_failed") from e
        hold(http_request, lease)
        return lease.model

    async def tokenizer_for(self, model: str | None, http_request: Request) -> ServedModel:
        """A model whose tokenizer is known: loaded once, it needs no engine (and no load) again."""
        self.check_model(model)
        served = self.pool.get(model)
        if served.tokenizer is not None and served.max_model_len is not None:
            return served
        return await self.model_for(model, http_request)

    def check_request(self, body: SamplingFields) -> None:
        """Everything about a body that can be refused before it is tokenized: the model, features we
        do not implement, text that is not Unicode. (Each route checks its own size limits too.)"""
        self.check_model(body.model)
        body.check_supported()
        body.check_text()

    def spec_of(self, http_request: Request, body: SamplingFields) -> RequestSpec:
        """How the request is served. Its client (for fairness and metrics) is the API key's tenant,
        else `user`, else nobody; its priority is capped at what the operator allows that tenant."""
        tenant = getattr(http_request.state, "tenant", None)
        return RequestSpec(
            client=tenant or body.user or None,
            priority=self.priority_caps.clamp(tenant, body.priority),
            cache_salt=body.cache_salt,
        )


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def resolve_max_tokens(
    requested: int | None,
    prompt_len: int,
    max_model_len: int,
    param: str,
    max_request_tokens: int | None = None,
) -> int:
    """None means as many as the context allows (OpenAI chat semantics), and as the KV cache can hold
    for one request when that is less. A prompt that leaves no room is the prompt's error, whatever
    max_tokens says."""
    room = max_model_len - prompt_len
    if room < 1:
        raise prompt_too_long(prompt_len, max_model_len)
    if requested is None:
        # Past the cache's capacity the engine's validation names the prompt as the problem.
        cache_room = room if max_request_tokens is None else max_request_tokens - prompt_len
        return max(1, min(room, cache_room))
    if requested < 1:
        raise InvalidRequestError(f"{param} must be >= 1, got {requested}", param=param)
    if prompt_len + requested > max_model_len:
        raise InvalidRequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the completion). "
            f"Please reduce the length of the prompt or {param}.",
            param=param,
        )
    return requested


@dataclass
class Submitted:
    """One engine request per prompt of the HTTP request; index offset for its n choices."""

    request_id: str
    prompt_len: int
    first_choice: int
    num_choices: int
    # The prompt's logprobs (RequestOutput.prompt_logprobs), once the engine has sent them.
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    def take_prompt_logprobs(self, delta: RequestDelta) -> None:
        if self.prompt_logprobs is None and delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs


async def submit_all(
    served: ServedModel,
    base_id: str,
    prompts: list[list[int]],
    make_params: Callable[[int], SamplingParams],  # prompt length -> params
    spec: RequestSpec,
) -> list[Submitted]:
    """Queue one engine request per prompt, all or none: a bad prompt rejects the whole batch."""
    params_list = [make_params(len(ids)) for ids in prompts]
    for params in params_list:  # the front end knows the vocabulary by its tokenizer (Ray instances too)
        params.check_vocabulary(served.engine.tokenizer.vocab_size)
    rids = [base_id] if len(prompts) == 1 else [f"{base_id}-{i}" for i in range(len(prompts))]
    await served.engine.submit_many(list(zip(rids, prompts, params_list, strict=True)), spec)
    return [
        Submitted(rid, len(ids), i * params.n, params.n)
        for i, (rid, ids, params) in enumerate(zip(rids, prompts, params_list, strict=True))
    ]


def prompt_logprobs_json(tok: Tokenizer, entries: list[TokenLogprobs | None]) -> list[dict | None]:
    """vLLM's prompt_logprobs: per prompt token, None for the first, else {token id: {logprob, rank,
    decoded_token}} for the prompt's own token and its top alternatives."""
    out: list[dict | None] = []
    for e in entries:
        if e is None:
            out.append(None)
            continue
        scored = {str(e.token_id): _logprob_json(tok, e.token_id, e.logprob, e.rank)}
        for rank, (token_id, logprob) in enumerate(e.top, 1):
            scored.setdefault(str(token_id), _logprob_json(tok, token_id, logprob, rank))
        out.append(scored)
    return out


def _logprob_json(tok: Tokenizer, token_id: int, logprob: float, rank: int) -> dict:
    return {"logprob": logprob, "rank": rank, "decoded_token": tok.id_to_token_text(token_id)}


ESTIMATE_HEADER = "x-sutra-estimated-completion-seconds"


async def estimate_headers(served: ServedModel, submitted: list[Submitted]) -> dict[str, str]:
    """The engine's completion-time estimate for the whole HTTP request, as a response header."""
    estimates = [await served.engine.estimated_finish(s.request_id) for s in submitted]
    known = [e for e in estimates if e is not None]
    return {ESTIMATE_HEADER: f"{max(known):.3f}"} if known else {}


async def merged_deltas(
    engine: EngineClient, submitted: list[Submitted]
) -> AsyncIterator[tuple[Submitted, RequestDelta]]:
    """Deltas of several requests as they come; leaving early aborts the unfinished ones."""
    if len(submitted) == 1:
        async for delta in engine.stream(submitted[0].request_id):
            yield submitted[0], delta
        return
    queue: asyncio.Queue[tuple[Submitted, RequestDelta] | BaseException | None] = asyncio.Queue()

    async def pump(s: Submitted) -> None:
        try:
            async for delta in engine.stream(s.request_id):
                queue.put_nowait((s, delta))
        except Exception as e:
            queue.put_nowait(e)
        finally:
            queue.put_nowait(None)

    tasks = [asyncio.create_task(pump(s)) for s in submitted]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        for s in submitted:
            engine.abort(s.request_id)


@contextlib.asynccontextmanager
async def abort_on_disconnect(http_request: Request, engine: EngineClient, request_ids: list[str]):
    """A client that goes away aborts its requests, which frees their KV blocks."""

    async def watch() -> None:
        while True:
            message = await http_request.receive()
            if message["type"] == "http.disconnect":
                for rid in request_ids:
                    engine.abort(rid)
                return

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


@dataclass
class ChoiceAccumulator:
    """A whole choice assembled from deltas, for non-streaming responses."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    def add(self, delta: CompletionDelta) -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        if delta.logprobs:
            self.logprobs += delta.logprobs
        if delta.finish_reason is not None:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason


async def collect_choices(
    served: ServedModel, http_request: Request, submitted: list[Submitted]
) -> tuple[list[ChoiceAccumulator], int]:
    """Whole choices in index order, and the prompt tokens served from the prefix cache."""
    choices: dict[int, ChoiceAccumulator] = {}
    cached = 0
    async with abort_on_disconnect(http_request, served.engine, [s.request_id for s in submitted]):
        async for sub, delta in merged_deltas(served.engine, submitted):
            sub.take_prompt_logprobs(delta)
            for c in delta.completions:
                choices.setdefault(sub.first_choice + c.index, ChoiceAccumulator()).add(c)
            if delta.finished:
                cached += delta.metrics.num_cached_tokens
    return [choices[i] for i in sorted(choices)], cached


async def sse_stream(
    served: ServedModel,
    http_request: Request,
    request_id: str,
    submitted: list[Submitted],
    *,
    object_name: str,
    include_usage: bool,
    to_choice: Callable[[Submitted, CompletionDelta], dict],
    preamble: list[dict] | None = None,
) -> AsyncIterator[str]:
    """Server-sent events of OpenAI chunks; errors after the headers went out become an error event."""
    created = int(time.time())
    completion_tokens = cached = 0
    finished: set[int] = set()

    def chunk(choices: list[dict], usage_block: dict | None = None) -> str:
        payload = {
            "id": request_id,
            "object": object_name,
            "created": created,
            "model": served.name,
            "choices": choices,
        }
        if include_usage:  # null on every chunk but the last, as OpenAI sends it
            payload["usage"] = usage_block
        return sse(payload)

    try:
        if preamble:
            yield chunk(preamble)
        async with abort_on_disconnect(http_request, served.engine, [s.request_id for s in submitted]):
            async for sub, delta in merged_deltas(served.engine, submitted):
                sub.take_prompt_logprobs(delta)
                choices = []
                for c in delta.completions:
                    # A request's delta lists all its n choices: one that finished earlier has nothing
                    # new, and its finish_reason went out once already.
                    index = sub.first_choice + c.index
                    if index in finished:
                        continue
                    if c.text or c.token_ids or c.finish_reason:
                        completion_tokens += len(c.token_ids)
                        choices.append(to_choice(sub, c))
                    if c.finish_reason is not None:
                        finished.add(index)
                if delta.finished:
                    cached += delta.metrics.num_cached_tokens
                if choices:
                    yield chunk(choices)
        if include_usage:
            prompt_tokens = sum(s.prompt_len for s in submitted)  # once per prompt, whatever n is
            yield chunk([], usage(prompt_tokens, completion_tokens, cached))
    except Exception as e:
        yield to_api_error(e).sse()
    yield SSE_DONE
