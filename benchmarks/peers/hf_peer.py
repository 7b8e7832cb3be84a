"""Hugging Face transformers ``generate`` on the HF copy of the model: static batches, left padding."""

from __future__ import annotations

import time
from typing import Any

from _worker import Request, main, set_thread_env


class HFAdapter:
    name = "hf"
    supports_offline = True
    supports_stream = True

    def __init__(self, wl: dict[str, Any]) -> None:
        set_thread_env(wl["threads"])
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(wl["threads"])
        self.torch = torch
        self.batch_size: int = wl["options"].get("batch_size", 32)
        dtype = getattr(torch, wl["dtype"])
        self.model = AutoModelForCausalLM.from_pretrained(wl["hf_dir"], dtype=dtype).eval()
        self.pad_id: int = self.model.config.pad_token_id or 0
        self.info = {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "dtype": wl["dtype"],
            "threads": torch.get_num_threads(),
            "batch_size": self.batch_size,
            "padding": "left",
            "batching": "arrival order, max_new_tokens = max of the batch",
            "attn_implementation": self.model.config._attn_implementation,
        }

    def settings(self) -> dict[str, Any]:
        return self.info

    def _batch(self, prompts: list[list[int]]) -> tuple[Any, Any]:
        width = max(len(p) for p in prompts)
        ids = [[self.pad_id] * (width - len(p)) + p for p in prompts]
        mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
        return self.torch.tensor(ids), self.torch.tensor(mask)

    def _run(self, prompts: list[list[int]], n_new: int, streamer: Any = None) -> Any:
        ids, mask = self._batch(prompts)
        with self.torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n_new,
                min_new_tokens=n_new,  # ignore EOS
                do_sample=False,
                pad_token_id=self.pad_id,
                streamer=streamer,
            )
        return out[:, ids.shape[1] :]

    def generate(self, requests: list[Request]) -> list[list[int]]:
        outs: list[list[int]] = []
        for i in range(0, len(requests), self.batch_size):
            chunk = requests[i : i + self.batch_size]
            new = self._run([r["prompt"] for r in chunk], max(r["max_tokens"] for r in chunk))
            outs += [row[: r["max_tokens"]].tolist() for row, r in zip(new, chunk, strict=True)]
        return outs

    def stream(self, prompt: list[int], max_tokens: int) -> tuple[list[int], float, float]:
        stamps: list[float] = []

        class Stamper:  # transformers calls put() with the prompt once, then once per new token
            def put(self, value: Any) -> None:
                stamps.append(time.perf_counter())

            def end(self) -> None:
                pass

        new = self._run([prompt], max_tokens, streamer=Stamper())
        return new[0].tolist(), stamps[1], stamps[-1]


if __name__ == "__main__":
    main(HFAdapter)
