"""llama.cpp through llama-cpp-python: single-stream decode and prompt processing only."""

from __future__ import annotations

import time
from typing import Any

from _worker import Request, main, set_thread_env


class LlamaCppAdapter:
    name = "llamacpp"
    supports_offline = False
    supports_stream = True

    def __init__(self, wl: dict[str, Any]) -> None:
        set_thread_env(wl["threads"])
        import llama_cpp

        opts = {"n_ctx": 1024, "n_batch": 512, "n_ubatch": 512} | wl["options"].get("llama", {})
        self.llm = llama_cpp.Llama(
            model_path=wl["gguf"],
            n_threads=wl["threads"],
            n_threads_batch=wl["threads"],
            verbose=False,
            **opts,
        )
        self.info = {
            "llama_cpp_python": llama_cpp.__version__,
            "gguf": wl["gguf"],
            "weights": wl["options"].get("weights", "?"),
            "threads": wl["threads"],
            **opts,
        }

    def settings(self) -> dict[str, Any]:
        return self.info

    def _decode(self, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
        self.llm.reset()
        toks: list[int] = []
        stamps: list[float] = []
        # generate() yields after each sampled token; it never stops on EOS by itself
        for tok in self.llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            stamps.append(time.perf_counter())
            toks.append(int(tok))
            if len(toks) == max_tokens:
                break
        return toks, stamps

    def generate(self, requests: list[Request]) -> list[list[int]]:
        return [self._decode(r["prompt"], r["max_tokens"])[0] for r in requests]

    def stream(self, prompt: list[int], max_tokens: int) -> tuple[list[int], float, float]:
        toks, stamps = self._decode(prompt, max_tokens)
        return toks, stamps[0], stamps[-1]


if __name__ == "__main__":
    main(LlamaCppAdapter)
