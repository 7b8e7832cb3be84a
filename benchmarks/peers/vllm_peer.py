"""vLLM (CPU build) offline ``LLM.generate`` on token-id prompts; per-token timing via ``LLMEngine.step``."""

from __future__ import annotations

import os
import time
from typing import Any

from _worker import Request, main

ENV_KEYS = (
    "VLLM_CPU_KVCACHE_SPACE",
    "VLLM_CPU_OMP_THREADS_BIND",
    "VLLM_CPU_NUM_OF_RESERVED_CPU",
    "VLLM_ENABLE_V1_MULTIPROCESSING",
    "OMP_NUM_THREADS",
    "LD_PRELOAD",
)


class VLLMAdapter:
    name = "vllm"
    supports_offline = True
    supports_stream = True

    def __init__(self, wl: dict[str, Any]) -> None:
        import vllm
        from vllm import LLM, SamplingParams

        self.params_cls = SamplingParams
        kwargs = {"model": wl["hf_dir"], "dtype": wl["dtype"], "seed": 0} | wl["options"].get(
            "llm_kwargs", {}
        )
        self.llm = LLM(**kwargs)
        self.info = {
            "vllm": vllm.__version__,
            "llm_kwargs": kwargs,
            "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
        }
        self._next_id = 0

    def settings(self) -> dict[str, Any]:
        return self.info

    def _params(self, max_tokens: int) -> Any:
        return self.params_cls(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)

    def generate(self, requests: list[Request]) -> list[list[int]]:
        prompts = [{"prompt_token_ids": r["prompt"]} for r in requests]
        params = [self._params(r["max_tokens"]) for r in requests]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def stream(self, prompt: list[int], max_tokens: int) -> tuple[list[int], float, float]:
        engine = self.llm.llm_engine
        self._next_id += 1
        engine.add_request(f"stream-{self._next_id}", {"prompt_token_ids": prompt}, self._params(max_tokens))
        toks: list[int] = []
        t_first = 0.0
        while engine.has_unfinished_requests():
            for out in engine.step():
                toks = list(out.outputs[0].token_ids)
                if toks and not t_first:
                    t_first = time.perf_counter()
        return toks, t_first, time.perf_counter()


if __name__ == "__main__":
    main(VLLMAdapter)
