"""The offline API: `LLM().generate(prompts, params)` and `LLM().chat(messages)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from tqdm import tqdm

from sutra.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from sutra.engine.engine import LLMEngine
from sutra.outputs import RequestOutput
from sutra.sampling_params import SamplingParams

Prompt = str | list[int]
Message = dict[str, str]


class LLM:
    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "auto",
        device: str = "auto",
        max_model_len: int | None = None,
        seed: int = 0,
        num_threads: int | None = None,
        batch_invariant: bool = False,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_memory_gb: float = 2.0,
        enable_prefix_caching: bool = True,
        max_num_batched_tokens: int = 512,
        max_num_seqs: int = 128,
        mode: str = "sarathi",
        policy: str = "fcfs",
        config: EngineConfig | None = None,
    ) -> None:
        self.config = config or EngineConfig(
            model=ModelConfig(
                model=model,
                dtype=dtype,
                device=device,
                max_model_len=max_model_len,
                seed=seed,
                num_threads=num_threads,
                batch_invariant=batch_invariant,
            ),
            cache=CacheConfig(
                block_size=block_size,
                num_blocks=num_kv_blocks,
                kv_cache_memory_gb=kv_cache_memory_gb,
                enable_prefix_caching=enable_prefix_caching,
            ),
            scheduler=SchedulerConfig(
                max_num_batched_tokens=max_num_batched_tokens,
                max_num_seqs=max_num_seqs,
                mode=mode,
                policy=policy,
            ),
        )
        self.engine = LLMEngine(self.config)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for each prompt (text or token ids); outputs come back in prompt order. Invalid
        input raises before anything runs; a request that fails while running comes back finished
        with `error` set (the others are unaffected)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        encoded = [self.engine.encode_prompt(p) for p in prompts]
        for ids, p in zip(encoded, params, strict=True):  # reject the batch before queueing any of it
            self.engine.validate(ids, p)
        request_ids = [f"offline-{next(self._ids)}" for _ in prompts]
        for rid, prompt, ids, p in zip(request_ids, prompts, encoded, params, strict=True):
            self.engine.add_request(rid, prompt, p, prompt_token_ids=ids)
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
