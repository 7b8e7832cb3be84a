"""Sutra's offline API: ``LLM.generate`` on token-id prompts."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from _worker import Request, main, set_thread_env

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root


class SutraAdapter:
    name = "sutra"
    supports_offline = True
    supports_stream = False

    def __init__(self, wl: dict[str, Any]) -> None:
        set_thread_env(wl["threads"])
        import torch

        torch.set_num_threads(wl["threads"])
        import sutra
        from sutra import LLM, SamplingParams

        self.params_cls = SamplingParams
        kwargs = {"dtype": wl["dtype"]} | wl["options"].get("llm_kwargs", {})
        self.llm = LLM(**kwargs)
        self.info = {
            "sutra": getattr(sutra, "__version__", "?"),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "llm_kwargs": kwargs,
        }

    def settings(self) -> dict[str, Any]:
        return self.info

    def generate(self, requests: list[Request]) -> list[list[int]]:
        params = [
            self.params_cls(max_tokens=r["max_tokens"], ignore_eos=True, temperature=0.0) for r in requests
        ]
        outs = self.llm.generate([r["prompt"] for r in requests], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def stream(self, prompt: list[int], max_tokens: int) -> tuple[list[int], float, float]:
        raise NotImplementedError


if __name__ == "__main__":
    main(SutraAdapter)
