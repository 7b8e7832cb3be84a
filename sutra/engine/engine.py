"""LLMEngine: requests in, one scheduler iteration per step(), RequestOutputs out."""

from __future__ import annotations

import dataclasses
import logging
import time

from sutra.config import EngineConfig
from sutra.core.kv_cache import KVCacheManager, prefix_cache_root
from sutra.core.output import RunnerOutput
from sutra.core.request import Request, RequestSpec, RequestStatus
from sutra.core.scheduler import Scheduler
from sutra.core.stats import EngineStats
from sutra.engine.detokenizer import IncrementalDetokenizer
from sutra.engine.migration import MigrationSource, MigrationTarget
from sutra.engine.moved_requests import MovedRequests, Tracked
from sutra.engine.runner import ModelRunner
from sutra.engine.step_isolation import run_isolating, tainted_requests
from sutra.errors import InvalidRequestError, prompt_too_long
from sutra.model.fingerprint import model_fingerprint
from sutra.model.loader import load_model
from sutra.outputs import CompletionOutput, RequestMetrics, RequestOutput
from sutra.sampling_params import SamplingParams
from sutra.sim.estimator import CompletionEstimator

logger = logging.getLogger(__name__)


class LLMEngine(MovedRequests):
    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        loaded = load_model(config.model)
        self.tokenizer = loaded.tokenizer
        self.arch = loaded.arch
        self.runner = ModelRunner(config, loaded)
        self.max_model_len = self.runner.max_model_len
        num_blocks = config.cache.num_blocks or max(
            1, int(config.cache.kv_cache_memory_gb * 2**30) // self.runner.bytes_per_block()
        )
        self.runner.allocate_kv_cache(num_blocks)
        fingerprint = model_fingerprint(
            loaded.arch, loaded.weights, f"{loaded.source}|seed={config.model.seed}"
        )
        self.kv = KVCacheManager(
            num_blocks,
            config.cache.block_size,
            config.cache.enable_prefix_caching,
            prefix_cache_root(fingerprint, str(self.runner.dtype), config.cache.block_size),
        )
        self.scheduler = Scheduler(config.scheduler, self.kv, self.max_model_len)
        self.estimator = CompletionEstimator()
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids)
        self._tracked: dict[str, Tracked] = {}
        self._child_to_parent: dict[str, tuple[str, int]] = {}
        # Tokens the last step() computed; 0 when nothing could be scheduled (e.g. every waiting
        # request is throttled), so a serving loop knows to wait rather than spin.
        self.last_step_num_scheduled_tokens = 0
        # A step log (sutra/engine/step_log.py) asks for each step's (cached context, new tokens).
        self.record_step_slices = False
        self.last_step_slices: list[tuple[int, int]] = []
        # Live migration: this engine as the source and as the destination of moving requests.
        self.migration_source = MigrationSource(self)
        self.migration_target = MigrationTarget(self)

    @property
    def max_request_tokens(self) -> int:
        """The most tokens (prompt plus output) one request can hold: the context length, or the
        whole KV cache if that is smaller. A default max_tokens should stay within it."""
        return self.scheduler.max_request_tokens

    # ---- requests --------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams | None = None) -> None:
        """Raise InvalidRequestError, naming the field, for a request the engine could never serve:
        checks the prompt, and with `params` what only the model and the cache size can tell."""
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if params is not None and params.pooling is not None:  # generates nothing: may fill the context
            if n > self.max_model_len:
                raise InvalidRequestError(
                    f"the prompt has {n} tokens but the model's context length is {self.max_model_len}",
                    param="prompt",
                )
        elif n >= self.max_model_len:
            raise prompt_too_long(n, self.max_model_len)
        bad = [t for t in prompt_token_ids if not 0 <= t < self.arch.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"token id {bad[0]} is outside the vocabulary [0, {self.arch.vocab_size})", param="prompt"
            )
        blocks = self.kv.blocks_needed(n + 1)
        if blocks > self.kv.pool.num_blocks:
            raise InvalidRequestError(
                f"the prompt has {n} tokens but the KV cache holds only "
                f"{self.kv.pool.num_blocks * self.kv.block_size}",
                param="prompt",
            )
        if params is not None:
            self._validate_params(n, params)

    def _validate_params(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        vocab = self.arch.vocab_size
        bad = [t for t in params.stop_token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(
                f"stop_token_ids: token id {bad[0]} is outside the vocabulary [0, {vocab})",
                param="stop_token_ids",
            )
        if params.min_tokens > 0:
            banned = set(params.stop_token_ids)
            if not params.ignore_eos:
                banned |= {t for t in self.eos_token_ids if 0 <= t < vocab}
            if len(banned) >= vocab:
                raise InvalidRequestError(
                    f"stop_token_ids and the end-of-sequence tokens cover the whole vocabulary ({vocab} "
                    f"tokens), so no token could be generated before min_tokens={params.min_tokens}",
                    param="stop_token_ids",
                )
        if params.structured_outputs is not None:
            # Raises, naming the field, for a spec over the size limit or one that does not compile.
            # The server compiles specs in a worker thread before it submits (sutra.server.structured),
            # so here, on its event loop, this is a cache hit.
            self.runner.structured.compile(params.structured_outputs)
        if params.pooling is not None:
            params.check_dimensions(self.arch.hidden_size)
            return  # only the prompt is computed: max_tokens takes no room
        # Capped like generation itself: a request stops at the context length whatever max_tokens says.
        total = min(num_prompt_tokens + params.max_tokens, self.max_model_len)
        if total > self.max_request_tokens:
            room = self.max_request_tokens - num_prompt_tokens
            raise InvalidRequestError(
                f"the prompt ({num_prompt_tokens} tokens) plus max_tokens ({params.max_tokens}) needs "
                f"{total} tokens of KV cache, but it holds only {self.max_request_tokens} tokens for "
                f"one request; set max_tokens to at most {room}",
                param="max_tokens",
            )

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        spec: RequestSpec = RequestSpec(),
        arrival_time: float | None = None,
        prompt_token_ids: list[int] | None = None,
    ) -> None:
        """Queue a request. Raises InvalidRequestError (and queues nothing) for bad input.
        prompt_token_ids, if given, are the already tokenized text prompt."""
        params = params or SamplingParams()
        if request_id in self._tracked:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        prompt_ids = prompt_token_ids if prompt_token_ids is not None else self.encode_prompt(prompt)
        self.validate(prompt_ids, params)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        child_ids = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        output = RequestOutput(
            request_id=request_id,
            prompt=prompt if isinstance(prompt, str) else None,
            prompt_token_ids=prompt_ids,
            outputs=[
                CompletionOutput(index=i, logprobs=[] if params.logprobs is not None else None)
                for i in range(params.n)
            ],
            metrics=RequestMetrics(arrival_time=arrival),
            prompt_logprobs=None if params.prompt_logprobs is None else [None] * len(prompt_ids),
        )
        self._tracked[request_id] = Tracked(
            output,
            child_ids,
            [IncrementalDetokenizer(self.tokenizer, prompt_ids, params) for _ in child_ids],
            len(child_ids),
        )
        # Only a single-sample request can move; one with n > 1 decodes where it prefilled.
        hand_off = self.config.scheduler.hand_off_after_prefill and params.n == 1
        for i, child_id in enumerate(child_ids):
            child_params = params if params.n == 1 else self._child_params(params, i)
            self._child_to_parent[child_id] = (request_id, i)
            self.scheduler.add_request(
                Request(
                    request_id=child_id,
                    prompt_token_ids=prompt_ids,
                    sampling_params=child_params,
                    eos_token_ids=self.eos_token_ids,
                    arrival_time=arrival,
                    spec=spec,
                    hand_off=hand_off,
                )
            )

    @staticmethod
    def _child_params(params: SamplingParams, index: int) -> SamplingParams:
        # Each of the n samples needs its own stream; with a seed they stay reproducible.
        seed = None if params.seed is None else params.seed * 1_000_003 + index
        return dataclasses.replace(params, n=1, seed=seed)

    def abort_request(self, request_id: str) -> None:
        tracked = self._tracked.get(request_id)
        if tracked is None:
            return
        for child_id in tracked.child_ids:
            self.scheduler.finish_request(child_id, RequestStatus.FINISHED_ABORTED)
        self._finish_all(request_id, "abort")

    def estimate_finishes(self, request_ids: list[str]) -> dict[str, float]:
        """Seconds from now until each request finishes (all its n samples), from the current queue,
        the policy's order and the step-latency model fitted online (one simulation for all)."""
        children = [
            (rid, self.scheduler.requests[child])
            for rid in request_ids
            if (tracked := self._tracked.get(rid)) is not None
            for child in tracked.child_ids
            if child in self.scheduler.requests
        ]
        times = self.estimator.estimate_finishes([r for _, r in children], self.scheduler)
        estimates: dict[str, float] = {}
        for (rid, _), seconds in zip(children, times, strict=True):
            estimates[rid] = max(estimates.get(rid, 0.0), seconds)
        return estimates

    def has_unfinished_requests(self) -> bool:
        return bool(self._tracked)

    def stats(self) -> EngineStats:
        return self.scheduler.stats()

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._tracked)

    # ---- one iteration ---------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduler iteration; return the outputs of the requests that made progress, and
        of those that failed in it (`error` set; the rest of the batch is unaffected)."""
        sched_out = self.scheduler.schedule()
        self.last_step_num_scheduled_tokens = sched_out.total_num_scheduled_tokens
        if self.record_step_slices:
            requests = self.scheduler.requests
            self.last_step_slices = [
                (requests[rid].num_computed_tokens, n)
                for rid, n in sched_out.num_scheduled_tokens.items()
                if rid in requests
            ]
        started = time.monotonic()
        for new in sched_out.new_requests:
            metrics = self._tracked[self._child_to_parent[new.request_id][0]].output.metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = started
        self.runner.apply_diff(sched_out)
        runner_out = run_isolating(self.runner, sched_out.num_scheduled_tokens)
        touched: dict[str, RequestOutput] = {}
        if runner_out.failed:
            for out in self._end_failed(sched_out.num_scheduled_tokens, runner_out):
                touched[out.request_id] = out
        self._record_prompt_logprobs(runner_out)
        updated = self.scheduler.update_from_output(sched_out, runner_out)
        now = time.monotonic()
        if sched_out.num_scheduled_tokens and not runner_out.failed:  # reruns would skew the latency model
            self.estimator.observe(
                sched_out.total_num_scheduled_tokens, len(sched_out.num_scheduled_tokens), now - started
            )
        for request in updated:
            parent_id, index = self._child_to_parent[request.request_id]
            tracked = self._tracked[parent_id]
            self._record_token(tracked, index, request, runner_out, now)
            touched[parent_id] = tracked.output
        for child_id, embedding in runner_out.embeddings.items():
            if (out := self._record_embedding(child_id, embedding, now)) is not None:
                touched[out.request_id] = out
        return list(touched.values())

    def _record_embedding(self, child_id: str, embedding: list[float], now: float) -> RequestOutput | None:
        """A pooling request computed its whole prompt: it ends here with its embedding, having
        generated nothing (pooling requests have n == 1, so the child is the request)."""
        request = self.scheduler.requests.get(child_id)
        parent = self._child_to_parent.get(child_id)
        if request is None or parent is None or request.status is not RequestStatus.RUNNING:
            return None
        self.scheduler.finish_request(child_id, RequestStatus.FINISHED_STOPPED)
        del self._child_to_parent[child_id]
        tracked = self._tracked.pop(parent[0])
        out = tracked.output
        out.embedding = embedding
        out.outputs[parent[1]].finish_reason = "stop"
        out.finished = True
        out.metrics.num_cached_tokens = request.num_cached_tokens
        out.metrics.num_preemptions = request.num_preemptions
        out.metrics.finished_time = now
        return out

    def _record_prompt_logprobs(self, runner_out: RunnerOutput) -> None:
        """Put the step's prompt logprobs in place (a recompute after preemption writes the same
        positions again; of n samples, each writes the same prompt's)."""
        for child_id, (first, entries) in runner_out.prompt_logprobs.items():
            parent = self._child_to_parent.get(child_id)
            if parent is None or child_id in runner_out.failed:
                continue
            scored = self._tracked[parent[0]].output.prompt_logprobs
            if scored is not None:
                scored[first : first + len(entries)] = entries

    def _record_token(
        self, tracked: Tracked, index: int, request: Request, runner_out: RunnerOutput, now: float
    ) -> None:
        out = tracked.output
        completion = out.outputs[index]
        token = request.token_ids[-1]
        completion.token_ids.append(token)
        if completion.logprobs is not None and request.request_id in runner_out.logprobs:
            completion.logprobs.append(runner_out.logprobs[request.request_id])
        m = out.metrics
        if m.first_token_time is None:
            m.first_token_time = now
            m.num_cached_tokens = request.num_cached_tokens
        m.last_token_time = now
        m.num_preemptions = max(m.num_preemptions, request.num_preemptions)
        stop = tracked.detokenizers[index].add(completion, token, final=request.status.finished)
        if stop is not None and not request.status.finished:
            self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED)
        if stop is not None:
            completion.finish_reason, completion.stop_reason = "stop", stop
        elif request.status.finished:
            completion.finish_reason = request.status.finish_reason
            completion.stop_reason = request.stop_token_id
        if completion.finished:
            self._child_to_parent.pop(request.request_id, None)
            tracked.num_unfinished -= 1
            if tracked.num_unfinished == 0:
                out.finished = True
                out.metrics.finished_time = now
                del self._tracked[out.request_id]

    def _end_failed(self, scheduled: dict[str, int], runner_out: RunnerOutput) -> list[RequestOutput]:
        """End each request that failed in this step (all n samples of it) with its error, and send
        back to recompute the requests whose slice read KV a failed one never wrote."""
        failed = runner_out.failed
        for request_id in tainted_requests(failed, scheduled, self.kv, self.scheduler.requests):
            self.scheduler.preempt_request(request_id)
            runner_out.sampled_token_ids.pop(request_id, None)
            runner_out.logprobs.pop(request_id, None)
            runner_out.embeddings.pop(request_id, None)
        ended = []
        for child_id, error in failed.items():
            parent = self._child_to_parent.get(child_id)
            if parent is None:
                continue  # ended already, with a sibling that failed in the same step
            parent_id, index = parent
            logger.warning("request %s failed: %s", parent_id, error)
            tracked = self._tracked[parent_id]
            tracked.output.error = error
            tracked.output.outputs[index].finish_reason = "error"
            for sibling_id in tracked.child_ids:
                self.scheduler.finish_request(sibling_id, RequestStatus.FINISHED_ABORTED)
            self._finish_all(parent_id, "abort")
            ended.append(tracked.output)
        return ended

    def _finish_all(self, request_id: str, reason: str) -> None:
        tracked = self._tracked.pop(request_id)
        for child_id, completion in zip(tracked.child_ids, tracked.output.outputs, strict=True):
            self._child_to_parent.pop(child_id, None)
            if completion.finish_reason is None:
                completion.finish_reason = reason
        tracked.output.finished = True
        tracked.output.metrics.finished_time = time.monotonic()
